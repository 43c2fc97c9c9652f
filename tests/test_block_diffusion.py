"""Block diffusion (LLaDA 2.0 BDLM): the attention mask, the loss at the two extreme block sizes, the block-size
schedule, the training options (SFT effective length, complementary masking, CAP, per-block time, embedding
noise), exact block-cached decoding and its default threshold, compare across paradigms, and the tiny configs
through fit / resume / predict / compare / eval."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS, DATA, check_ok, fit_config, run_cli, scalars
from nanollada.evaluation.block_likelihood import block_diffusion_elbo, block_diffusion_logits
from nanollada.lm.block_diffusion import BlockSizeSchedule, block_diffusion_loss
from nanollada.lm.diffusion import masked_diffusion_loss
from nanollada.model import ModelConfig, Transformer, block_causal_mask, block_diffusion_mask, document_attention_mask
from nanollada.sampling.block_diffusion import block_diffusion_generate, canvas_length
from nanollada.sampling.diffusion import ConfidenceThreshold, LowConfidence

V, MASK = 64, 63


def tiny_model(layers=2, seed=0, max_len=128):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=layers, n_heads=4, n_kv_heads=2,
                                   max_seq_len=max_len, causal=False)).eval()


# ------------------------------------------------------------------------------------------------ the mask
def test_mask_matches_the_facts_table_L4_B2():
    """llada2-facts.md §1: L=4, B=2; rows = queries xt0..xt3, x00..x03; columns the same keys."""
    table = [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0],
             [0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0],
             [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0],
             [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]
    mask = block_diffusion_mask(torch.zeros(1, 4, dtype=torch.long), 2)
    assert mask.shape == (1, 1, 8, 8)
    assert mask[0, 0].int().tolist() == table


def test_mask_respects_documents_and_never_lets_x0_see_xt():
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1]])
    m = block_diffusion_mask(docs, 4)[0, 0]
    L = 8
    assert not m[L:, :L].any()  # x_0 never attends to x_t
    d = docs[0].repeat(2)
    assert not (m & (d[:, None] != d[None, :])).any()  # nothing crosses a document (padding -1 is its own)
    assert m.diagonal().all()  # no empty row


def test_block_causal_mask():
    assert block_causal_mask(4, 2).int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_clean_half_is_independent_of_the_noisy_half():
    model = tiny_model()
    ids = torch.randint(0, MASK, (2, 8))
    docs = torch.zeros(2, 8, dtype=torch.long)
    positions = torch.arange(8).repeat(2)
    out = []
    for noisy in (ids, torch.full_like(ids, MASK)):
        out.append(model(torch.cat([noisy, ids], 1), attn_mask=block_diffusion_mask(docs, 2), positions=positions))
    assert torch.allclose(out[0][:, 8:], out[1][:, 8:], atol=1e-5)
    assert not torch.allclose(out[0][:, :8], out[1][:, :8], atol=1e-3)


# ------------------------------------------------------------------------------------------------ the loss
def test_block_size_L_is_exactly_masked_diffusion_on_the_same_draws():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, MASK, (3, 16), generator=g)
    docs = torch.tensor([[0] * 16, [0] * 8 + [1] * 8, [0] * 12 + [-1] * 4])
    eligible = docs >= 0
    p_mask = torch.tensor([0.2, 0.5, 0.9])
    masked = (torch.rand(ids.shape, generator=g) < p_mask[:, None]) & eligible
    noisy = torch.where(masked, MASK, ids)
    bd = block_diffusion_logits(model, noisy, ids, docs, 16)
    md = model(noisy, attn_mask=document_attention_mask(docs, causal=False))
    assert torch.allclose(bd, md, atol=1e-5)
    a = block_diffusion_loss(bd, ids, masked, eligible, p_mask[:, None].expand(3, 16))
    b = masked_diffusion_loss(md, ids, masked, eligible, p_mask)
    assert torch.allclose(a, b, atol=1e-6)


@torch.no_grad()
def test_block_size_1_is_next_token_prediction_in_expectation():
    """With blocks of one token, x_t position i sees only itself and x_0[< i]: its prediction is next-token
    prediction from a mask token. The loss is unbiased: its mean over draws equals the all-masked loss, which equals
    the causal computation position by position."""
    model = tiny_model(layers=2)
    ids = torch.randint(0, MASK, (1, 8), generator=torch.Generator().manual_seed(0))
    docs = torch.zeros(1, 8, dtype=torch.long)
    eligible = torch.ones(1, 8, dtype=torch.bool)
    logits_all = block_diffusion_logits(model, torch.full_like(ids, MASK), ids, docs, 1)
    exact = F.cross_entropy(logits_all[0], ids[0])  # E[loss] (p_mask = 1: every position masked, weight 1)
    # the same number position by position: x_0[<i] then a mask at i, causal attention, RoPE positions 0..i
    causal_ce = []
    for i in range(8):
        seq = torch.cat([ids[:, :i], torch.tensor([[MASK]])], 1)
        out = model(seq, attn_mask=torch.ones(i + 1, i + 1, dtype=torch.bool).tril()[None, None])
        causal_ce.append(F.cross_entropy(out[:, -1], ids[:, i]))
    assert torch.allclose(exact, torch.stack(causal_ce).mean(), atol=1e-5)
    g = torch.Generator().manual_seed(1)
    draws = []
    for _ in range(3000):
        p = torch.rand(1, generator=g).clamp(min=0.05)
        masked = torch.rand(1, 8, generator=g) < p
        noisy = torch.where(masked, MASK, ids)
        logits = block_diffusion_logits(model, noisy, ids, docs, 1)
        draws.append(block_diffusion_loss(logits, ids, masked, eligible, p.expand(1, 8)))
    d = torch.stack(draws)
    assert abs(float(d.mean() - exact)) < 4 * float(d.std()) / math.sqrt(len(d))


def test_elbo_with_zero_logits_is_L_log_V():
    class Zero(torch.nn.Module):
        def forward(self, ids, attn_mask=None, positions=None, inputs_embeds=None):
            return torch.zeros(*ids.shape, V)
    ids = torch.randint(0, MASK, (4, 8))
    nll = block_diffusion_elbo(Zero(), ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids), MASK, 4,
                               num_samples=64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(nll.mean(), torch.tensor(8 * math.log(V)), rtol=0.05)


# ------------------------------------------------------------------------------------------------ schedule
def test_block_size_schedule_warmup_stable_decay():
    s = BlockSizeSchedule(warmup_sizes=[1, 4, 32, 64], warmup_steps=8, stable_steps=4, decay_sizes=[64, 32],
                          decay_steps=4)
    got = [s(step, 128) for step in range(20)]
    assert got == [1, 1, 4, 4, 32, 32, 64, 64, 128, 128, 128, 128, 64, 64, 32, 32, 32, 32, 32, 32]
    assert BlockSizeSchedule(stable_steps=3)(10, 256) == 256
    with pytest.raises(ValueError, match="warmup_sizes"):
        BlockSizeSchedule(warmup_steps=5)


# ------------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("strategy", [LowConfidence(steps=3), ConfidenceThreshold(0.02)], ids=["lowconf", "thresh"])
def test_block_cache_is_exact_on_a_multi_layer_model(strategy):
    model = tiny_model(layers=4, seed=1)
    prompt = torch.randint(0, MASK, (2, 11), generator=torch.Generator().manual_seed(2))  # a partial last block
    G = canvas_length(11, 20, 8, 128)
    assert (11 + G) % 8 == 0 and G >= 20
    runs = []
    for use_cache in (False, True):
        log = []
        out = block_diffusion_generate(model, prompt, gen_length=G, block_size=8, strategy=strategy, mask_id=MASK,
                                       use_cache=use_cache, logits_log=log)
        runs.append((out, log))
    (a, la), (b, lb) = runs
    assert torch.equal(a.tokens, b.tokens) and a.forwards == b.forwards == len(la) == len(lb)
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(la, lb))
    assert torch.equal(a.tokens[:, :11], prompt)  # the prompt is never overwritten
    assert b.forward_tokens < a.forward_tokens  # the cache feeds only uncached blocks
    assert a.steps_per_block[0] >= 1 and len(a.steps_per_block) == (11 + G) // 8 - 11 // 8


def test_eos_ends_block_decoding_early():
    class EosModel(torch.nn.Module):
        cfg = ModelConfig(vocab_size=V, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64, causal=False)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, attn_mask=None, kv_cache=None, cache_pos=0, **_):
            out = torch.zeros(*ids.shape, V)
            out[..., 5] = 10.0  # eos everywhere, confidently
            return out
    out = block_diffusion_generate(EosModel(), torch.tensor([[1, 2, 3]]), gen_length=29, block_size=8,
                                   strategy=ConfidenceThreshold(0.9), mask_id=MASK, eos_id=5, use_cache=False)
    assert out.forwards == 1 and (out.generated == 5).all()


# ------------------------------------------------------------------------------------------------ through the CLI
STEPS = dict(max_steps=6, val_check_interval=6, limit_val_batches=1, log_every_n_steps=1)


@pytest.fixture(scope="module")
def bd_runs(tmp_path_factory):
    """A tiny AR -> BDLM conversion run with a block-size schedule, then block-diffusion SFT from it."""
    work = tmp_path_factory.mktemp("bd")
    sched = {"class_path": "nanollada.lm.BlockSizeSchedule",
             "init_args": {"warmup_sizes": [1, 4], "warmup_steps": 2, "stable_steps": 2, "decay_sizes": [16],
                           "decay_steps": 2}}
    conv = fit_config(work / "conv", "conv", base=CONFIGS / "tiny" / "block_diffusion_from_ar.yaml", trainer=STEPS,
                      model=dict(init_from=None, block_schedule=sched, block_size=16),
                      data=dict(seq_len=32, batch_size=4))
    r = run_cli(["fit", "--config", conv], work, threads=1, timeout=300)
    check_ok(r, "block-diffusion conversion fit")
    conv_ckpt = work / "conv" / "checkpoints" / "last.ckpt"
    sft = fit_config(work / "sft", "sft", base=CONFIGS / "tiny" / "block_diffusion_sft.yaml", trainer=STEPS,
                     train_files=[DATA / "sft.jsonl"], model=dict(init_from=str(conv_ckpt), block_size=16, cap_lambda=0.5),
                     data=dict(seq_len=96, batch_size=4, max_val_rows=4))
    r = run_cli(["fit", "--config", sft], work, threads=1, timeout=300)
    check_ok(r, "block-diffusion SFT fit")
    return work, conv_ckpt, work / "sft" / "checkpoints" / "last.ckpt"


def test_conversion_follows_the_block_size_schedule(bd_runs):
    work, _, _ = bd_runs
    sizes = scalars(work / "conv" / "logs" / "conv" / "version_0", "train/block_size")
    assert [sizes[s] for s in sorted(sizes)] == [1, 4, 32, 32, 16, 16]  # warmup 1, 4; stable L=32; decay 16
    nll = scalars(work / "conv" / "logs" / "conv" / "version_0", "val/nll")
    assert all(0 < v < 2 * math.log(8192) for v in nll.values())


def test_sft_logs_cap_and_decodes_through_predict_compare_eval(bd_runs):
    work, conv, sft = bd_runs
    assert scalars(work / "sft" / "logs" / "sft" / "version_0", "train/cap_entropy")
    out = work / "p.jsonl"
    r = run_cli(["predict", "--ckpt", sft, "--prompt", "Name three colours.", "--max_new_tokens", "16",
                 "--strategy", "threshold", "--threshold", "0.9", "--output", out], work)  # block: the trained 16
    check_ok(r, "predict")
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["paradigm"] == "block_diffusion" and rec["block_length"] == 16
    assert (rec["prompt_tokens"] + rec["generated_tokens"]) % 16 == 0
    assert sum(rec["steps_per_block"]) == rec["forwards"] >= 1
    cmp_out = work / "cmp.json"
    r = run_cli(["compare", "--ckpt", f"[{sft}]", "--prompt", "Hi", "--max_new_tokens", "8", "--strategies",
                 "[threshold, low_confidence]", "--output", cmp_out], work)
    check_ok(r, "compare")
    runs = [s["run"] for s in json.loads(cmp_out.read_text())["summary"]]
    assert runs == ["block_diffusion/threshold", "block_diffusion/low_confidence"]
    pairs = work / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"good": "the cat sat on the mat", "bad": "cat the mat on sat the"})
                               for _ in range(3)) + "\n")
    ev = work / "ev.json"
    r = run_cli(["eval", "--ckpt", conv, "--tasks", pairs, "--samples", "2", "--output", ev], work)
    check_ok(r, "eval")
    res = json.loads(ev.read_text())
    task = next(iter(res["results"].values()))["pairs"]
    assert task["estimate"].startswith("block_elbo_b16") and 0 <= task["accuracy"] <= 1


def test_seq_len_must_be_a_multiple_of_the_block_size(tmp_path):
    cfg = fit_config(tmp_path, "bad", base=CONFIGS / "tiny" / "block_diffusion_pretrain.yaml", trainer=STEPS,
                     data=dict(seq_len=40, batch_size=2))
    r = run_cli(["fit", "--config", cfg], tmp_path, threads=1, timeout=300)
    assert r.returncode != 0 and "data.seq_len=40 is not a multiple of the block size 32" in r.stderr


def test_merge_averages_weights_into_a_normal_checkpoint(bd_runs, tmp_path):
    work, conv, sft = bd_runs
    out = tmp_path / "merged.ckpt"
    r = run_cli(["merge", "--ckpt", conv, sft, "--output", out], work)
    check_ok(r, "merge")
    a, b, m = (torch.load(p, weights_only=True) for p in (conv, sft, out))
    for name, w in m["state_dict"].items():
        torch.testing.assert_close(w, (a["state_dict"][name].float() + b["state_dict"][name].float()) / 2)
    assert m["nanollada"]["merged_from"] == [str(conv), str(sft)] and "optimizer_states" not in m
    r = run_cli(["predict", "--ckpt", out, "--prompt", "Hi", "--max_new_tokens", "8", "--block_length", "8"], work)
    check_ok(r, "predict on the merged checkpoint")
    ar = work / "ar.ckpt"
    torch.save({**a, "nanollada": {**a["nanollada"], "paradigm": "ar"}}, ar)
    bad = run_cli(["merge", "--ckpt", conv, ar, "--output", tmp_path / "x.ckpt"], work)
    assert bad.returncode != 0 and "differs from" in bad.stderr and "paradigm" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x.ckpt").exists()


# ------------------------------------------------------------------------------------------------ training options
def bd_lm(**kw):
    """A tiny BlockDiffusionLM on the shipped tokenizer, attached to an unfitted Trainer (global step 0)."""
    import lightning as L
    from nanollada.lm import BlockDiffusionLM
    torch.manual_seed(0)
    lm = BlockDiffusionLM(preset="tiny", max_seq_len=64, **{"block_size": 4, **kw})
    lm.trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    lm.log = lambda *a, **k: None
    return lm


def bd_spy(monkeypatch, boost: float = 0.0):
    """Record what training_loss hands to block_diffusion_logits / block_diffusion_loss; ``boost`` adds that much to
    the target's logit at every even position (so some predictions are right)."""
    import nanollada.lm.block_diffusion as mod
    seen, logits_fn, loss_fn = {}, mod.block_diffusion_logits, mod.block_diffusion_loss

    def logits(model, noisy, clean, docs, block, inputs_embeds=None):
        out = logits_fn(model, noisy, clean, docs, block, inputs_embeds=inputs_embeds)
        if boost:
            even = (torch.arange(clean.shape[1]) % 2 == 0)[None, :, None]
            out = out + boost * F.one_hot(clean, out.shape[-1]) * even
        seen.update(noisy=noisy, ids=clean, docs=docs, block=block, embeds=inputs_embeds, logits=out)
        return out

    def loss(logits_, ids, masked, eligible, p_mask):
        seen.update(masked=masked, eligible=eligible, p_mask=p_mask)
        return loss_fn(logits_, ids, masked, eligible, p_mask)
    monkeypatch.setattr(mod, "block_diffusion_logits", logits)
    monkeypatch.setattr(mod, "block_diffusion_loss", loss)
    return seen


def bd_sft_batch(tok, answers=("Four, I think.", "Hi!", "Hello there, how are you doing today my friend?")):
    """Single-turn SFT rows of different lengths from DiffusionCollate (eos padding up to the longest + 1)."""
    from nanollada.data.collate import DiffusionCollate
    items = []
    for a in answers:
        ids, mask = tok.render_chat([{"role": "user", "content": "What is two plus two?"},
                                     {"role": "assistant", "content": a}])
        items.append({"tokens": torch.tensor(ids), "loss_mask": torch.tensor(mask)})
    return DiffusionCollate("sft", tok.pad_id, tok.eos_id)(items), items


def row_ce(logits, ids):
    return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none").view_as(ids)


def test_complementary_masking_views_are_disjoint_and_weighted_1_over_p_and_1_over_1_minus_p(monkeypatch):
    lm = bd_lm(complementary_masking=True)
    seen = bd_spy(monkeypatch)
    batch, _ = bd_sft_batch(lm.tokenizer)
    R = batch["input_ids"].shape[0]
    with torch.no_grad():
        loss = lm.training_loss(batch, 0)
    masked, eligible, p, ids, noisy = seen["masked"], seen["eligible"], seen["p_mask"], seen["ids"], seen["noisy"]
    assert masked.shape[0] == 2 * R and torch.equal(ids[:R], ids[R:]) and torch.equal(eligible[:R], eligible[R:])
    first, second = masked[:R], masked[R:]
    assert not (first & second).any()  # disjoint
    assert torch.equal(first | second, eligible[:R])  # together exactly the eligible positions
    assert first.any() and second.any()
    mask_id = lm.tokenizer.mask_id
    assert torch.equal(noisy[:R], torch.where(first, mask_id, ids[:R]))
    assert torch.equal(noisy[R:], torch.where(second, mask_id, ids[:R]))  # the complement masks the clean row
    assert (p == p[:, :1]).all()  # one time per row
    torch.testing.assert_close(p[R:], (1 - p[:R]).clamp(min=1e-3))
    # the loss by hand: row r of view 1 weighs its masked CE by 1/p_r, view 2 by 1/(1 - p_r); each divided by
    # the row's eligible count; mean over the 2R rows (all have eligible tokens)
    ce = row_ce(seen["logits"], ids)
    n = eligible[:R].sum(1)
    pr = p[:R, 0]
    view1 = (ce[:R] * first).sum(1) / pr / n
    view2 = (ce[R:] * second).sum(1) / (1 - pr) / n
    assert loss.item() == pytest.approx(torch.cat([view1, view2]).mean().item(), rel=1e-5)


def test_cap_entropy_is_the_mean_entropy_of_correct_masked_predictions():
    from nanollada.lm.block_diffusion import cap_entropy
    logits = torch.tensor([[[2.0, 0.0, 0.0],    # masked, argmax 0 == target 0: counts
                            [0.0, 1.0, 0.0],    # masked, argmax 1 != target 0: wrong
                            [0.0, 0.0, 3.0],    # argmax 2 == target 2 but not masked
                            [0.5, -1.0, 0.2]]],  # masked, argmax 0 == target 0: counts
                          requires_grad=True)
    ids = torch.tensor([[0, 0, 2, 0]])
    masked = torch.tensor([[True, True, False, True]])

    def entropy(row):
        p = [math.exp(x) for x in row]
        p = [x / sum(p) for x in p]
        return -sum(x * math.log(x) for x in p)
    want = (entropy([2.0, 0.0, 0.0]) + entropy([0.5, -1.0, 0.2])) / 2
    cap = cap_entropy(logits, ids, masked)
    assert cap.item() == pytest.approx(want, rel=1e-6)
    cap.backward()
    # the gradient flows through the entropy of the counted positions only (the correctness mask is a constant)
    assert (logits.grad[0, 1] == 0).all() and (logits.grad[0, 2] == 0).all()
    for i in (0, 3):
        row = logits[0, i].detach().clone().requires_grad_(True)
        lp = F.log_softmax(row, -1)
        (-(lp.exp() * lp).sum() / 2).backward()
        torch.testing.assert_close(logits.grad[0, i], row.grad)
    # none correct: 0, and no gradient
    wrong = torch.tensor([[2, 2, 0, 2]])
    z = logits.detach().requires_grad_(True)
    cap0 = cap_entropy(z, wrong, masked)
    assert cap0.item() == 0.0
    cap0.backward()
    assert (z.grad == 0).all()


def test_cap_lambda_adds_lambda_times_cap_to_the_loss(monkeypatch):
    from nanollada.lm.block_diffusion import cap_entropy
    lm = bd_lm()
    seen = bd_spy(monkeypatch, boost=20.0)
    batch, _ = bd_sft_batch(lm.tokenizer)
    with torch.no_grad():
        base = lm.training_loss(batch, 0)
        lm.hparams.cap_lambda = 0.7
        with_cap = lm.training_loss(batch, 0)  # same step and batch index: the same masks
    cap = cap_entropy(seen["logits"], seen["ids"], seen["masked"])
    assert cap.item() > 0
    assert with_cap.item() == pytest.approx(base.item() + 0.7 * cap.item(), rel=1e-5)


def test_sft_rounds_each_row_up_to_whole_blocks_with_eos(monkeypatch):
    """LLaDA 2.0 §5 effective length: row r (its tokens plus the first eos after its answer, n_r) is eligible up to
    ceil(n_r / B) * B; the eos beyond are padding (not eligible, document -1: never attended)."""
    lm = bd_lm(block_size=8)
    tok = lm.tokenizer
    seen = bd_spy(monkeypatch)
    batch, items = bd_sft_batch(tok)
    with torch.no_grad():
        lm.training_loss(batch, 0)
    ids, eligible, docs = seen["ids"], seen["eligible"], seen["docs"]
    T = ids.shape[1]
    assert T % 8 == 0 and T >= batch["input_ids"].shape[1]
    spans = [(int(it["loss_mask"].nonzero()[0]), int(it["loss_mask"].nonzero()[-1]) + 1) for it in items]
    assert len(set(-(-(n + 1) // 8) for _, n in spans)) > 1  # rows of different effective lengths
    for r, (it, (start, n)) in enumerate(zip(items, spans)):
        eff = -(-(n + 1) // 8) * 8  # the row, its first eos, then eos up to the block boundary
        assert ids[r, :n].tolist() == it["tokens"][:n].tolist() and (ids[r, n:] == tok.eos_id).all()
        assert eligible[r].tolist() == [start <= i < eff for i in range(T)], r
        assert docs[r].tolist() == [0 if i < eff else -1 for i in range(T)], r
    # the block mask keeps padding to itself
    m = block_diffusion_mask(docs, 8)
    pad = (docs < 0).repeat(1, 2)
    assert not (m[:, 0] & (pad[:, :, None] != pad[:, None, :])).any()


def test_pretraining_rows_are_not_cut_by_the_sft_rounding(monkeypatch):
    lm = bd_lm(block_size=8)
    seen = bd_spy(monkeypatch)
    ids = torch.randint(10, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[0, -1] = ids[1, 7] = lm.tokenizer.eos_id  # a document ending at the row's end, and one inside it
    docs = torch.tensor([[0] * 16, [0] * 8 + [1] * 8])
    batch = {"input_ids": ids, "eligible": torch.ones_like(ids, dtype=torch.bool), "doc_ids": docs}
    with torch.no_grad():
        lm.training_loss(batch, 0)
    assert seen["eligible"].all() and torch.equal(seen["docs"], docs) and torch.equal(seen["ids"], ids)


def test_per_block_time_is_constant_in_a_block_and_stratified_over_batch_x_blocks():
    from nanollada.noise import EPS, StratifiedTime
    calls = []

    class Spy(StratifiedTime):
        def __call__(self, batch_size, *a, **k):
            calls.append(batch_size)
            return super().__call__(batch_size, *a, **k)
    lm = bd_lm(per_block_time=True, mask_ratio=Spy())
    B, L, block = 3, 16, 4
    ids = torch.randint(10, 500, (B, L))
    eligible = torch.ones_like(ids, dtype=torch.bool)
    _, masked, p = lm.noise(ids, eligible, block, torch.Generator().manual_seed(0))
    K = L // block
    assert calls == [B * K]  # one draw per (row, block)
    blocks = p.view(B, K, block)
    assert (blocks == blocks[..., :1]).all()  # constant inside a block
    t = ((blocks[..., 0] - EPS) / (1 - EPS)).flatten()
    assert len(set(t.tolist())) == B * K  # different across blocks
    assert sorted((t * B * K).floor().long().tolist()) == list(range(B * K))  # one t per stratum [i, i+1)/(B K)
    # per row (the default): one time for the whole row
    lm.hparams.per_block_time = False
    _, _, p_row = lm.noise(ids, eligible, block, torch.Generator().manual_seed(0))
    assert calls[-1] == B and (p_row == p_row[:, :1]).all()


def test_embed_noise_touches_only_masked_embeddings_and_only_during_embed_noise_steps(monkeypatch):
    """Mirror of test_training_options' masked-diffusion test: the same weights and masks, with and without noise."""
    from nanollada.lm import BlockDiffusionLM
    step = [0]
    monkeypatch.setattr(BlockDiffusionLM, "global_step", property(lambda self: step[0]))
    lm = bd_lm(embed_noise_std=0.5, embed_noise_steps=2)
    seen = bd_spy(monkeypatch)
    ids = torch.randint(10, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "eligible": torch.ones_like(ids, dtype=torch.bool),
             "doc_ids": torch.zeros_like(ids)}
    losses = {}
    with torch.no_grad():
        for s in range(4):
            step[0] = s
            for std in (0.5, 0.0):
                lm.hparams.embed_noise_std = std
                losses[s, std] = lm.training_loss(batch, 0).item()
                if s == 0 and std == 0.5:
                    embeds, masked, noisy = seen["embeds"], seen["masked"], seen["noisy"]
                    clean = lm.model.embed(torch.cat([noisy, ids], 1))
                    moved = (embeds - clean).abs().amax(-1) > 0
                    assert masked.any() and torch.equal(moved, torch.cat([masked, torch.zeros_like(masked)], 1))
                else:
                    assert (seen["embeds"] is None) == (std == 0.0 or s >= 2)
    assert all(abs(losses[s, 0.5] - losses[s, 0.0]) > 1e-4 for s in (0, 1)), losses
    assert all(losses[s, 0.5] == losses[s, 0.0] for s in (2, 3)), losses  # no noise: bit-identical


# ------------------------------------------------------------------------------------------------ decoding defaults
def loaded(tok, paradigm: str, seed: int = 0):
    from nanollada.loading import LoadedModel
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64,
                      causal=paradigm == "ar")
    return LoadedModel(Transformer(cfg).eval(), tok, paradigm, f"{paradigm}.ckpt",
                       paradigm_config={"block_size": 8} if paradigm == "block_diffusion" else {})


def test_block_diffusion_decodes_at_threshold_095_by_default(shipped_tokenizer):
    """LLaDA 2.0 / dInfer threshold 0.95 for block diffusion; masked diffusion keeps its own; explicit values and
    the editing presets still win."""
    from nanollada.generate import GenerationSettings
    bd = loaded(shipped_tokenizer, "block_diffusion").interface
    md = loaded(shipped_tokenizer, "diffusion").interface
    s = GenerationSettings().resolve(bd.default_generation())
    assert s.threshold == 0.95 and s.strategy == "threshold"
    assert json.loads(bd.decoding_key(GenerationSettings()))["threshold"] == 0.95
    assert GenerationSettings().resolve(md.default_generation()).threshold == 0.9
    assert GenerationSettings(threshold=0.7).resolve(bd.default_generation()).threshold == 0.7
    assert GenerationSettings(editing="speedy").resolve(bd.default_generation()).editing_thresholds() == (0.5, 0.0)
    custom = GenerationSettings(editing="custom").resolve(bd.default_generation())
    assert custom.editing_thresholds() == (0.95, 0.9)  # HF LLaDA2.1's pair


def test_compare_lists_ar_masked_and_block_diffusion_side_by_side(shipped_tokenizer):
    from nanollada.evaluation.compare import compare, format_table
    from nanollada.generate import GenerationSettings
    models = [loaded(shipped_tokenizer, p, seed) for seed, p in enumerate(("ar", "diffusion", "block_diffusion"))]
    res = compare(models, ["Hi"], GenerationSettings(max_new_tokens=8, greedy=True), ["threshold"])
    assert [s["run"] for s in res["summary"]] == ["ar", "diffusion/threshold", "block_diffusion/threshold"]
    assert [s["checkpoint"] for s in res["summary"]] == ["ar.ckpt", "diffusion.ckpt", "block_diffusion.ckpt"]
    for s in res["summary"]:
        assert s["prompts"] == 1 and s["forwards"] >= 1 and s["seconds"] > 0 and "tokens_per_forward" in s
    assert [r["run"] for r in res["runs"]] == [s["run"] for s in res["summary"]]
    table = format_table(res)
    assert all(f"| {name} |" in table for name in ("ar", "diffusion/threshold", "block_diffusion/threshold"))


# ------------------------------------------------------------------------------------------------ tiny config
def test_tiny_block_diffusion_pretrain_trains_through_the_cli(tmp_path):
    cfg = fit_config(tmp_path, "bdp", base=CONFIGS / "tiny" / "block_diffusion_pretrain.yaml",
                     trainer=dict(max_steps=2, val_check_interval=2, limit_val_batches=1, log_every_n_steps=1),
                     model=dict(block_size=8, val_samples=1), data=dict(seq_len=32, batch_size=2, max_val_rows=2))
    r = run_cli(["fit", "--config", cfg], tmp_path, threads=1, timeout=120)
    check_ok(r, "tiny block-diffusion pretrain fit")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    meta = torch.load(ckpt, weights_only=True)["nanollada"]
    assert meta["paradigm"] == "block_diffusion" and meta["paradigm_config"]["block_size"] == 8
    nll = scalars(tmp_path / "logs" / "bdp" / "version_0", "val/nll")
    assert nll and all(math.isfinite(v) and v > 0 for v in nll.values())
