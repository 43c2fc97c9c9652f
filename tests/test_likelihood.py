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


def test_key_padding_mask_rows_never_empty():
    real = torch.tensor([[True, True, False], [True, True, True]])
    mask = key_padding_mask(real)
    assert mask.shape == (2, 1, 3, 3) and mask.any(-1).all()
    assert not mask[0, 0, 0, 2] and not mask[0, 0, 2, 0]
    assert key_padding_mask(torch.ones(2, 3, dtype=torch.bool)) is None
