"""Likelihoods: exact AR log-probs, padding invariance, diffusion ELBO and LLaDA's conditional estimator."""

import math

import pytest
import torch
from torch import nn

from nanollada.evaluation.likelihood import (ar_sequence_logprob, diffusion_conditional_logprob, diffusion_elbo,
                                             key_padding_mask)
from nanollada.model import ModelConfig, Transformer

V, PAD, BOS, MASK = 64, 0, 1, 63


def tiny(causal: bool, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=V, causal=causal, max_seq_len=64,
                                               init_std=0.2)).eval()


class ZeroLogits(nn.Module):
    """Uniform predictions: every CE is ln V."""

    def forward(self, idx, attn_mask=None, **kw):
        return torch.zeros(*idx.shape, V)


CONTEXTS = [[BOS, 5, 6], [BOS], [BOS, 7, 8, 9, 10, 11], [BOS, 12]]
TARGETS = [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29]]


def test_ar_logprob_matches_per_sequence_loop():
    m = tiny(causal=True)
    lp, n = ar_sequence_logprob(m, CONTEXTS, TARGETS, PAD, batch_size=3)
    for i, (c, t) in enumerate(zip(CONTEXTS, TARGETS)):
        seq = torch.tensor([c + t])
        logp = m(seq)[0].log_softmax(-1)
        want = sum(logp[j - 1, seq[0, j]].item() for j in range(len(c), len(c) + len(t)))
        assert lp[i].item() == pytest.approx(want, abs=1e-4)
        assert n[i].item() == len(t)


def test_ar_logprob_padding_invariant_and_empty_context():
    m = tiny(causal=True)
    batch, _ = ar_sequence_logprob(m, CONTEXTS, TARGETS, PAD, batch_size=4)
    for i in range(len(CONTEXTS)):
        alone, _ = ar_sequence_logprob(m, [CONTEXTS[i]], [TARGETS[i]], PAD)
        assert alone[0].item() == pytest.approx(batch[i].item(), abs=1e-4)
    # empty context: the first target token is context, the rest are scored like context=[that token]
    lp, n = ar_sequence_logprob(m, [[], [BOS]], [[BOS, 5, 6], [5, 6]], PAD)
    assert n.tolist() == [2, 2] and lp[0].item() == pytest.approx(lp[1].item(), abs=1e-4)


def test_elbo_zero_logits_is_n_ln_v():
    B, T = 256, 24
    ids = torch.randint(2, V - 1, (B, T), generator=torch.Generator().manual_seed(0))
    eligible = torch.ones(B, T, dtype=torch.bool)
    eligible[:, :4] = False  # a "prompt" that is never scored
    g = torch.Generator().manual_seed(1)
    nll = diffusion_elbo(ZeroLogits(), ids, eligible, MASK, num_samples=16, generator=g)
    expected = 20 * math.log(V)
    assert nll.shape == (B,)
    assert nll.mean().item() == pytest.approx(expected, rel=0.04)


def test_elbo_unbiased_on_short_rows():
    """Independent masking keeps E[masked / p_mask] = 1 even when a row has only 3 eligible tokens."""
    B = 4000
    ids = torch.full((B, 5), 7)
    eligible = torch.tensor([[False, True, True, True, False]]).expand(B, 5)
    nll = diffusion_elbo(ZeroLogits(), ids, eligible, MASK, num_samples=8, generator=torch.Generator().manual_seed(0))
    assert nll.mean().item() == pytest.approx(3 * math.log(V), rel=0.05)


def test_elbo_deterministic_and_finite_on_real_model():
    m = tiny(causal=False)
    ids = torch.randint(2, V - 1, (3, 12), generator=torch.Generator().manual_seed(0))
    real = torch.ones(3, 12, dtype=torch.bool)
    real[1, 8:] = False
    ids[~real] = PAD
    mask = key_padding_mask(real)

    def run(seed):
        return diffusion_elbo(m, ids, real, MASK, num_samples=4, generator=torch.Generator().manual_seed(seed),
                              attn_mask=mask)
    a = run(3)
    assert torch.equal(a, run(3)) and not torch.equal(a, run(4))
    assert torch.isfinite(a).all() and (a > 0).all()


def test_conditional_zero_logits_exact():
    g = torch.Generator().manual_seed(0)
    lp, n = diffusion_conditional_logprob(ZeroLogits(), CONTEXTS, TARGETS, MASK, PAD, num_samples=5, generator=g,
                                          batch_size=3)
    assert n.tolist() == [len(t) for t in TARGETS]
    assert torch.allclose(lp, -n.double() * math.log(V), rtol=1e-6)


def test_conditional_single_token_exact_and_padding_invariant():
    """With one target token l = L = 1 always: the estimate is the exact log p of the masked token."""
    m = tiny(causal=False)
    ctx, tgt = [[BOS, 5, 6, 7], [BOS, 9], [BOS, 10, 11, 12, 13, 14, 15]], [[20], [21], [22]]
    g = torch.Generator().manual_seed(0)
    lp, _ = diffusion_conditional_logprob(m, ctx, tgt, MASK, PAD, num_samples=2, generator=g, batch_size=8)
    for i, (c, t) in enumerate(zip(ctx, tgt)):
        logits = m(torch.tensor([c + [MASK]]))[0, -1]
        want = logits.log_softmax(-1)[t[0]].item()
        assert lp[i].item() == pytest.approx(want, abs=1e-4)
        alone, _ = diffusion_conditional_logprob(m, [c], [t], MASK, PAD, num_samples=1, generator=g)
        assert alone[0].item() == pytest.approx(want, abs=1e-4)


def test_conditional_deterministic_under_seed():
    m = tiny(causal=False)

    def run(seed):
        return diffusion_conditional_logprob(m, CONTEXTS, TARGETS, MASK, PAD, num_samples=4,
                                             generator=torch.Generator().manual_seed(seed), batch_size=2)[0]
    a = run(0)
    assert torch.equal(a, run(0)) and not torch.equal(a, run(1))
    assert (a < 0).all()


def test_conditional_mask_counts_are_stratified():
    """Record the number of masked tokens per forward: l_k covers 1..L evenly and context is never masked."""
    seen = []

    class Spy(ZeroLogits):
        def forward(self, idx, attn_mask=None, **kw):
            seen.append(((idx == MASK).sum(1).tolist(), (idx[:, :2] == MASK).any().item()))
            return super().forward(idx)

    diffusion_conditional_logprob(Spy(), [[BOS, 5]], [[10, 11, 12, 13]], MASK, PAD, num_samples=4,
                                  generator=torch.Generator().manual_seed(0))
    counts = sorted(c[0] for c, _ in seen)
    assert counts == [1, 2, 3, 4]
    assert not any(ctx_masked for _, ctx_masked in seen)


def test_conditional_without_groups_keeps_its_numbers():
    """groups=None draws exactly as before groups existed (numbers recorded from that version)."""
    lp, _ = diffusion_conditional_logprob(tiny(causal=False), CONTEXTS, TARGETS, MASK, PAD, num_samples=3,
                                          generator=torch.Generator().manual_seed(7), batch_size=3)
    assert lp.tolist() == pytest.approx([-7.305771191914876, -24.228504180908203, -8.723079681396484,
                                         -22.369749704996746], rel=1e-5)


def test_conditional_groups_share_the_draws():
    """Pairs of one group with equal target lengths see the same l_k and the same masked target positions in every
    sample; each pair's mask counts are still LLaDA's stratified schedule over 1..L; other groups draw their own."""
    ctx = [BOS, 5, 6]
    contexts = [ctx, ctx, ctx, [BOS, 7]]
    targets = [[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33, 34, 35], [40, 41, 42, 43]]
    seen = []

    class Spy(ZeroLogits):
        def forward(self, idx, attn_mask=None, **kw):
            seen.append(idx.clone())
            return super().forward(idx)

    K = 4
    lp, _ = diffusion_conditional_logprob(Spy(), contexts, targets, MASK, PAD, num_samples=K,
                                          generator=torch.Generator().manual_seed(3), batch_size=8,
                                          groups=[0, 0, 0, 1])
    assert torch.allclose(lp, -torch.tensor([4.0, 4, 6, 4], dtype=torch.float64) * math.log(V))
    order = sorted(range(4), key=lambda i: len(contexts[i]) + len(targets[i]))  # the estimator's row order
    assert len(seen) == K
    masks = {i: [(x[order.index(i), len(contexts[i]): len(contexts[i]) + len(targets[i])] == MASK).tolist()
                 for x in seen] for i in range(4)}
    assert masks[0] == masks[1]  # same group, same length: the same noise in every sample
    assert masks[3] != masks[0]  # another group draws its own
    for i in range(4):
        L = len(targets[i])
        counts = sorted(sum(m) for m in masks[i])
        assert len(set(counts)) == K and 1 <= counts[0] and counts[-1] <= L  # spread over 1..L as without groups
        assert L != K or counts == list(range(1, L + 1))
        assert not any((x[order.index(i), :len(contexts[i])] == MASK).any() for x in seen)  # context never masked


def test_conditional_groups_align_the_shared_draws_at_the_target_end():
    """Cloze choices of different lengths share the rest of the sentence: its tokens get the same rank scores, so in
    every sample the masked suffix positions of one choice are a subset of the other's (lowest scores first)."""
    suffix = list(range(30, 40))
    contexts, targets = [[BOS, 5], [BOS, 5]], [[10] + suffix, [20, 21, 22] + suffix]
    seen = []

    class Spy(ZeroLogits):
        def forward(self, idx, attn_mask=None, **kw):
            seen.append(idx.clone())
            return super().forward(idx)

    diffusion_conditional_logprob(Spy(), contexts, targets, MASK, PAD, num_samples=16, batch_size=8,
                                  generator=torch.Generator().manual_seed(0), groups=[0, 0])
    nested = 0
    for x in seen:  # row 0 is the shorter pair (length-sorted), right-padded; context = 2 tokens
        a = set((x[0, 3:13] == MASK).nonzero().flatten().tolist())  # masked suffix positions 0..9 of each row
        b = set((x[1, 5:15] == MASK).nonzero().flatten().tolist())
        assert a <= b or b <= a, (a, b)
        nested += a != b
    assert 0 < nested < len(seen)  # the counts l_k of the two lengths differ in some samples, not in all


def test_conditional_groups_exact_cases_and_batch_size_independence():
    m = tiny(causal=False)
    groups = [0, 0, 1, 1]
    g = torch.Generator().manual_seed(0)
    lp, n = diffusion_conditional_logprob(ZeroLogits(), CONTEXTS, TARGETS, MASK, PAD, num_samples=5, generator=g,
                                          batch_size=3, groups=groups)
    assert torch.allclose(lp, -n.double() * math.log(V), rtol=1e-6)
    ctx, tgt = [[BOS, 5, 6, 7], [BOS, 9], [BOS, 10, 11, 12, 13, 14, 15]], [[20], [21], [22]]
    lp, _ = diffusion_conditional_logprob(m, ctx, tgt, MASK, PAD, num_samples=2, generator=g, groups=[0, 0, 0])
    for i, (c, t) in enumerate(zip(ctx, tgt)):  # one target token: l = L = 1, the exact log p
        assert lp[i].item() == pytest.approx(m(torch.tensor([c + [MASK]]))[0, -1].log_softmax(-1)[t[0]].item(),
                                             abs=1e-4)

    def run(batch_size):
        return diffusion_conditional_logprob(m, CONTEXTS, TARGETS, MASK, PAD, num_samples=4, batch_size=batch_size,
                                             generator=torch.Generator().manual_seed(1), groups=groups)[0]
    assert torch.allclose(run(1), run(4), rtol=1e-5)  # draws belong to groups, not to mini-batches
    with pytest.raises(ValueError, match="groups"):
        diffusion_conditional_logprob(m, CONTEXTS, TARGETS, MASK, PAD, num_samples=1, groups=[0, 1])


def multiple_choice_task(n_items: int, seed: int = 0):
    """Synthetic cloze-style items: 4 choices that differ in their first target token and share the rest."""
    import random
    rng = random.Random(seed)
    contexts, targets, groups = [], [], []
    for i in range(n_items):
        ctx = [BOS] + [rng.randrange(2, 60) for _ in range(rng.randint(3, 8))]
        rest = [rng.randrange(2, 60) for _ in range(rng.randint(3, 6))]
        for _ in range(4):
            contexts.append(ctx)
            targets.append([rng.randrange(2, 60)] + rest)
            groups.append(i)
    return contexts, targets, groups


def test_shared_draws_make_choice_rankings_more_stable_across_seeds():
    """With 4 samples, 4 seeds: the predicted choice agrees between seeds more often when an item's choices share
    their draws, and the spread of choice-score differences over seeds shrinks (measured: agreement 0.40 -> 0.55,
    spread 3.9 -> 2.3 nats on this task; over 9 model/task seeds the gain was +0.10 to +0.26)."""
    m = tiny(causal=False)
    N, K = 40, 4
    contexts, targets, groups = multiple_choice_task(N)

    def stability(share: bool) -> tuple[float, float]:
        runs = [diffusion_conditional_logprob(m, contexts, targets, MASK, PAD, num_samples=4, batch_size=16,
                                              generator=torch.Generator().manual_seed(seed),
                                              groups=groups if share else None)[0].view(N, K) for seed in range(4)]
        preds = [r.argmax(1) for r in runs]
        agree = [(preds[a] == preds[b]).float().mean().item() for a in range(4) for b in range(a + 1, 4)]
        spread = torch.stack([r[:, 1:] - r[:, :1] for r in runs]).std(0).mean().item()
        return sum(agree) / len(agree), spread

    (agree_indep, spread_indep), (agree_shared, spread_shared) = stability(False), stability(True)
    assert agree_shared >= agree_indep + 0.08, (agree_indep, agree_shared)
    assert spread_shared <= 0.75 * spread_indep, (spread_indep, spread_shared)


def test_key_padding_mask_rows_never_empty():
    real = torch.tensor([[True, True, False], [True, True, True]])
    mask = key_padding_mask(real)
    assert mask.shape == (2, 1, 3, 3) and mask.any(-1).all()
    assert not mask[0, 0, 0, 2] and not mask[0, 0, 2, 0]
    assert key_padding_mask(torch.ones(2, 3, dtype=torch.bool)) is None
