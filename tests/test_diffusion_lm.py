"""Masked diffusion training pieces: mask-ratio samplers, masking, the LLaDA loss, the ELBO, AR -> diffusion init."""

import math

import pytest
import torch

from nanollada.data.collate import DiffusionCollate
from nanollada.lm.diffusion import MaskedDiffusionLM, eos_padding_weights, masked_diffusion_loss
from nanollada.noise import (EPS, ClippedBand, IIDTime, StratifiedTime, WSDMaskRatio, apply_random_mask,
                             mask_probability)

MASK = 4


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_iid_time_is_uniform():
    t = IIDTime()(20000, generator=gen())
    assert t.shape == (20000,) and 0 <= t.min() and t.max() <= 1
    assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.005


def test_stratified_time_has_one_draw_per_stratum():
    t = StratifiedTime()(8, generator=gen(3))
    strata = (t * 8).floor().long().sort().values
    assert strata.tolist() == list(range(8))
    assert not torch.equal(t, t.sort().values)  # rows are shuffled, not ordered by stratum


def test_stratified_time_draws_on_the_generators_device(monkeypatch):
    """The permutation is drawn on the generator's device (a CUDA generator cannot drive a CPU randperm)."""
    want = StratifiedTime()(8, generator=gen(3))
    seen = []
    real = torch.randperm

    def spy(*args, **kw):
        seen.append(kw.get("device"))
        return real(*args, **kw)

    monkeypatch.setattr(torch, "randperm", spy)
    g = gen(3)
    got = StratifiedTime()(8, generator=g, device="cpu")
    assert seen == [g.device]  # the generator's device, passed explicitly
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # and the same draw as before on CPU
    StratifiedTime()(8)  # no generator: the default device
    assert seen[-1] is None or torch.device(seen[-1]).type == "cpu"


def test_clipped_band_stays_in_band_and_rejects_bad_bounds():
    t = ClippedBand(0.3, 0.8)(5000, generator=gen())
    assert t.min() >= 0.3 and t.max() <= 0.8 and abs(t.mean() - 0.55) < 0.01
    with pytest.raises(ValueError):
        ClippedBand(0.8, 0.3)


def test_wsd_mask_ratio_follows_its_schedule():
    s = WSDMaskRatio(warmup_steps=10, stable_steps=10, decay_steps=10, start=0.1, peak=0.5, end=0.3, spread=0.05)
    assert s.centre(0) == pytest.approx(0.1) and s.centre(5) == pytest.approx(0.3)
    assert s.centre(15) == pytest.approx(0.5) and s.centre(25) == pytest.approx(0.4) and s.centre(100) == 0.3
    t = s(4000, step=15, generator=gen())
    assert t.min() >= 0.45 and t.max() <= 0.55


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masking_rate_follows_t(p):
    ids = torch.randint(10, 100, (4, 5000), generator=gen())
    eligible = torch.ones_like(ids, dtype=torch.bool)
    noisy, masked = apply_random_mask(ids, eligible, mask_probability(torch.full((4,), p)), MASK, gen(1))
    rate = masked.float().mean(1)
    assert torch.allclose(rate, torch.full((4,), (1 - EPS) * p + EPS), atol=0.02)
    assert torch.equal(noisy == MASK, masked) and torch.equal(noisy[~masked], ids[~masked])


def test_ineligible_tokens_are_never_masked_and_a_row_may_have_none():
    ids = torch.randint(10, 100, (64, 20), generator=gen())
    eligible = torch.zeros_like(ids, dtype=torch.bool)
    eligible[:, 12:] = True  # an SFT row: prompt 0..11, response 12..19
    _, masked = apply_random_mask(ids, eligible, torch.full((64,), 1e-6), MASK, gen(2))
    assert not masked.any()  # p ~ 0 masks nothing (LLaDA: no forced token, such a row contributes zero loss)
    _, masked = apply_random_mask(ids, eligible, torch.full((64,), 0.5), MASK, gen(2))
    assert not masked[:, :12].any() and masked[:, 12:].any()


def test_training_loss_is_unbiased_on_short_answers():
    """E[loss] over masks and t ~ U(0, 1) equals the mean CE of the eligible tokens when the logits are fixed.

    With fixed logits the per-row estimator is X = sum_i m_i c_i / (p n) with m_i ~ Bernoulli(p), so E[X | t] =
    sum_i c_i / n for every t, and Var X = E_t[(1 - p) / p] sum_i c_i^2 / n^2 with E_t[(1 - p) / p] =
    ln(1 / eps) / (1 - eps) - 1. The old "at least one masked token" rule added ~+169% at n = 3.
    """
    N, V, n = 200_000, 7, 3
    logits = torch.randn(1, n + 2, V, generator=gen(5)).expand(N, -1, -1)
    ids = torch.randint(0, V, (1, n + 2), generator=gen(6)).expand(N, -1).contiguous()
    eligible = torch.zeros(N, n + 2, dtype=torch.bool)
    eligible[:, 2:] = True  # two prompt tokens, a 3-token answer
    p_mask = mask_probability(IIDTime()(N, generator=gen(7)))
    _, masked = apply_random_mask(ids, eligible, p_mask, MASK, gen(8))
    loss = masked_diffusion_loss(logits, ids, masked, eligible, p_mask).item()
    ce = torch.nn.functional.cross_entropy(logits[0], ids[0], reduction="none")[2:].double()
    exact = ce.mean().item()
    std = math.sqrt((math.log(1 / EPS) / (1 - EPS) - 1) * (ce ** 2).sum().item() / n ** 2 / N)
    assert abs(loss - exact) < 5 * std, (loss, exact, std)
    assert 5 * std < 0.05 * exact  # the test can see a 5% bias


def test_sft_collate_then_masking_never_touches_the_prompt(shipped_tokenizer):
    tok = shipped_tokenizer
    ids, mask = tok.render_chat([{"role": "user", "content": "What is two plus two?"},
                                 {"role": "assistant", "content": "Four."}])
    short, smask = tok.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    items = [{"tokens": torch.tensor(i), "loss_mask": torch.tensor(m)} for i, m in ((ids, mask), (short, smask))]
    batch = DiffusionCollate("sft", tok.pad_id, tok.eos_id)(items)
    prompt = ~batch["eligible"]
    for _ in range(20):
        _, masked = apply_random_mask(batch["input_ids"], batch["eligible"], torch.ones(2), MASK)
        assert not (masked & prompt).any()
        assert masked[batch["eligible"]].all()  # p_mask = 1 masks every response and padding token
    # the shorter row is padded with eos, and that padding is eligible (LLaDA: the model learns to stop)
    assert (batch["input_ids"][1, len(short):] == tok.eos_id).all() and batch["eligible"][1, len(short):].all()


def test_loss_is_finite_with_one_masked_token_and_with_all_masked():
    V, B, T = 50, 2, 12
    logits = torch.randn(B, T, V, generator=gen())
    ids = torch.randint(0, V, (B, T), generator=gen(1))
    eligible = torch.ones(B, T, dtype=torch.bool)
    one = torch.zeros(B, T, dtype=torch.bool)
    one[:, 3] = True
    p_small = mask_probability(torch.zeros(B))  # p = eps: weight 1/eps = 1000
    loss_one = masked_diffusion_loss(logits, ids, one, eligible, p_small)
    loss_all = masked_diffusion_loss(logits, ids, eligible, eligible, torch.ones(B))
    assert torch.isfinite(loss_one) and torch.isfinite(loss_all)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(B, T)
    assert loss_all == pytest.approx(ce.mean().item(), rel=1e-5)  # all masked at p=1: plain mean CE
    assert loss_one == pytest.approx((ce[:, 3] / p_small[0] / T).mean().item(), rel=1e-5)


def test_sft_loss_is_normalised_by_answer_length():
    V = 30
    logits = torch.zeros(2, 10, V)  # every CE is ln V
    ids = torch.zeros(2, 10, dtype=torch.long)
    eligible = torch.zeros(2, 10, dtype=torch.bool)
    eligible[0, 6:] = True  # answer of 4
    eligible[1, 2:] = True  # answer of 8
    loss = masked_diffusion_loss(logits, ids, eligible, eligible, torch.ones(2))
    assert loss == pytest.approx(math.log(V), rel=1e-5)  # each row: (n * lnV) / n


def sft_batch(tok):
    """Two single-turn SFT rows from DiffusionCollate: the shorter one ends in several eos padding tokens."""
    chats = [[{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four, I think."}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    items = [dict(zip(("tokens", "loss_mask"), map(torch.tensor, tok.render_chat(c)))) for c in chats]
    return DiffusionCollate("sft", tok.pad_id, tok.eos_id)(items)


def test_eos_padding_weights_mark_the_padding_beyond_the_first_eos(shipped_tokenizer):
    tok = shipped_tokenizer
    batch = sft_batch(tok)
    ids, eligible = batch["input_ids"], batch["eligible"]
    w = eos_padding_weights(ids, eligible, tok.eos_id, 0.25)
    for row, elig, wr in zip(ids.tolist(), eligible.tolist(), w.tolist()):
        first = row.index(tok.eos_id)
        assert row[first - 1] == tok.im_end_id and elig[first]
        assert wr[:first + 1] == [1.0] * (first + 1) and wr[first + 1:] == [0.25] * (len(row) - first - 1)
    assert (w[1] == 0.25).sum() >= 3  # the short answer has several extra eos


def test_weighted_loss_formula():
    V, B, T = 11, 3, 9
    logits = torch.randn(B, T, V, generator=gen(1))
    ids = torch.randint(0, V, (B, T), generator=gen(2))
    eligible = torch.zeros(B, T, dtype=torch.bool)
    eligible[:, 3:] = True
    eligible[2] = False  # nothing eligible: left out of the mean
    masked = eligible & (torch.rand(B, T, generator=gen(3)) < 0.6)
    p = torch.tensor([0.6, 0.5, 0.4])
    w = torch.ones(B, T)
    w[:, 6:] = 0.3
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(B, T)
    rows = [(ce[b] * masked[b] * w[b]).sum() / p[b] / (eligible[b] * w[b]).sum() for b in range(2)]
    got = masked_diffusion_loss(logits, ids, masked, eligible, p, weights=w)
    assert got == pytest.approx(sum(rows).item() / 2, rel=1e-5)
    assert masked_diffusion_loss(logits, ids, masked, eligible, p, weights=torch.ones(B, T)) == \
        masked_diffusion_loss(logits, ids, masked, eligible, p)


class AllMasked(IIDTime):
    def __call__(self, batch_size, step=0, generator=None, device="cpu"):
        return torch.ones(batch_size, device=device)


@pytest.mark.parametrize("weight", [1.0, 0.0, 0.5])
def test_eos_pad_weight_reaches_the_training_loss(shipped_tokenizer, weight):
    """At t = 1 every eligible token is masked, so the loss is exactly sum w CE / sum w per row (eq. 5 at w = 1)."""
    import lightning as L
    tok = shipped_tokenizer
    lm = MaskedDiffusionLM(preset="tiny", max_seq_len=64, mask_ratio=AllMasked(), random_length_prob=0.0,
                           eos_pad_weight=weight)
    assert lm.hparams.eos_pad_weight == weight
    lm.trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    lm.log = lambda *a, **k: None
    batch = sft_batch(tok)
    ids, eligible = batch["input_ids"], batch["eligible"]
    with torch.no_grad():
        loss = lm.training_loss(batch, 0)
        logits = lm.forward_model(torch.where(eligible, tok.mask_id, ids), attn_mask=lm.attention_mask(batch))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
    w = eligible * eos_padding_weights(ids, eligible, tok.eos_id, weight)
    assert loss.item() == pytest.approx(((ce * w).sum(1) / w.sum(1)).mean().item(), rel=1e-4)


def test_eos_pad_weight_is_checked():
    with pytest.raises(ValueError, match="eos_pad_weight"):
        MaskedDiffusionLM(preset="tiny", max_seq_len=64, eos_pad_weight=-0.1)


def zero_logit_model():
    lm = MaskedDiffusionLM(preset="tiny", max_seq_len=64)
    with torch.no_grad():
        lm.model.embed.weight.zero_()  # tied head: every logit is 0
    return lm


def test_validation_elbo_of_zero_logits_is_ln_v_per_token():
    lm = zero_logit_model()
    V = lm.config.vocab_size
    ids = torch.randint(10, V, (8, 32), generator=gen())
    batch = {"input_ids": ids, "eligible": torch.ones_like(ids, dtype=torch.bool),
             "doc_ids": torch.zeros_like(ids), "needs_doc_mask": False, "needs_pad_mask": False}
    totals = [lm.eval_sums(batch, batch_idx=i) for i in range(20)]
    per_token = sum(t[0] for t in totals) / sum(t[1] for t in totals)
    assert per_token.item() == pytest.approx(math.log(V), rel=0.05)
    again = lm.eval_sums(batch, batch_idx=0)[0]
    assert again == totals[0][0]  # fixed validation seeds: the same masks every pass


def test_diffusion_model_is_bidirectional_and_ar_init_matches_every_tensor(tmp_path):
    from nanollada.lm.ar import ARLM
    ar = ARLM(preset="tiny", max_seq_len=64)
    assert ar.model.cfg.causal and not MaskedDiffusionLM(preset="tiny", max_seq_len=64).model.cfg.causal
    path = tmp_path / "ar.ckpt"
    ckpt = {"state_dict": ar.state_dict(), "nanollada": {"paradigm": "ar", "tokenizer_fingerprint":
                                                         ar.tokenizer.fingerprint()}}
    torch.save(ckpt, path)
    dm = MaskedDiffusionLM(preset="tiny", max_seq_len=64)
    report = dm.load_weights_from(str(path))  # what init_from does when a fresh fit starts
    assert set(report["matched"]) == set(ar.model.state_dict()) and not report["missing"]
    assert torch.equal(dm.model.embed.weight, ar.model.embed.weight)
    # a different shape is reported, not silently copied
    report2 = MaskedDiffusionLM(preset="tiny", max_seq_len=64, d_model=64).load_weights_from(str(path))
    assert report2["shape_mismatch"] and "embed.weight" not in report2["matched"]
    # another tokenizer is refused
    ckpt["nanollada"]["tokenizer_fingerprint"] = "0123456789abcdef"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="tokenizer"):
        MaskedDiffusionLM(preset="tiny", max_seq_len=64).load_weights_from(str(path))
