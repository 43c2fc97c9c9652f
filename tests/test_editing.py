"""LLaDA 2.1 token editing: the decoder (tau_edit = 1 is plain threshold decoding; the prompt is never edited;
decoding terminates) and the training objective (a model trained with it repairs corrupted tokens far more often
than one trained without it)."""

import random

import pytest
import torch

from conftest import check_ok, finish, fit_config, start_cli, write_jsonl, CONFIGS
from nanollada.generate import GenerationSettings
from nanollada.model import ModelConfig, Transformer, block_causal_mask
from nanollada.sampling.block_diffusion import block_diffusion_generate
from nanollada.sampling.diffusion import ConfidenceThreshold

V, MASK = 64, 63


def model(layers=3, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=layers, n_heads=4, n_kv_heads=2,
                                   max_seq_len=128, causal=False)).eval()


@pytest.mark.parametrize("use_cache", [False, True])
def test_edit_threshold_one_is_threshold_decoding_token_for_token(use_cache):
    m, prompt = model(), torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(1))
    plain = block_diffusion_generate(m, prompt, gen_length=27, block_size=8, strategy=ConfidenceThreshold(0.05),
                                     mask_id=MASK, use_cache=use_cache)
    edit = block_diffusion_generate(m, prompt, gen_length=27, block_size=8, strategy=ConfidenceThreshold(0.05),
                                    mask_id=MASK, use_cache=use_cache, edit_threshold=1.0)
    assert torch.equal(plain.tokens, edit.tokens) and edit.edits == 0
    assert edit.forwards == plain.forwards + len(plain.steps_per_block)  # one edit check per block, nothing edited


def test_aggressive_editing_never_touches_the_prompt_and_terminates():
    m = model(seed=2)
    prompt = torch.randint(0, MASK, (1, 13), generator=torch.Generator().manual_seed(3))  # partial prompt block
    out = block_diffusion_generate(m, prompt, gen_length=19, block_size=8, strategy=ConfidenceThreshold(0.5),
                                   mask_id=MASK, edit_threshold=0.0, max_post_edit_steps=5, use_cache=True,
                                   temperature=1.0, generator=torch.Generator().manual_seed(0))  # proposals vary
    assert torch.equal(out.tokens[:, :13], prompt)
    assert out.edits > 0 and not (out.generated == MASK).any()
    # each block: at most one forward per masked position plus max_post_edit_steps edit-only steps
    assert all(n <= 8 + 5 for n in out.steps_per_block) and out.forwards == sum(out.steps_per_block)


def test_editing_presets_and_validation():
    assert GenerationSettings(editing="speedy").editing_thresholds() == (0.5, 0.0)
    assert GenerationSettings(editing="quality").editing_thresholds() == (0.7, 0.5)
    assert GenerationSettings(editing="custom", threshold=0.95, edit_threshold=0.9).editing_thresholds() == (0.95, 0.9)
    assert GenerationSettings().editing_thresholds() is None
    with pytest.raises(ValueError, match="--edit_threshold 1.5"):
        GenerationSettings(edit_threshold=1.5)


# ------------------------------------------------------------------------------------------------ the objective
WORDS = "red green blue yellow black white orange purple".split()


def pattern_lines(n, seed):
    """Texts with a strong local rule (each word is followed by the next colour of a fixed cycle)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, n_words = rng.randrange(len(WORDS)), rng.randint(36, 90)  # many distinct texts (for the val split)
        out.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(n_words)))
    return out


def restore_rate(ckpt, seed=0, n_rows=24, n_corrupt=3, tau=0.5, steps=4) -> float:
    """Corrupt n_corrupt tokens of the last block of clean pattern rows; run edit-only steps (the decoder's rule:
    rewrite where argmax != token and p > tau) over that block; share of corrupted positions restored."""
    from nanollada.loading import load_checkpoint
    lm = load_checkpoint(str(ckpt))
    tok, net = lm.tokenizer, lm.model
    rng = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(tok.special_ids))
    restored = total = 0
    for text in pattern_lines(n_rows, seed=1000 + seed):
        ids = torch.tensor([[tok.bos_id] + tok.encode(text)[:31]])
        clean = ids.clone()
        s, e = 24, 32
        pos = s + torch.randperm(e - s, generator=rng)[:n_corrupt]
        x = ids.clone()
        for p in pos.tolist():
            while True:
                r = int(torch.randint(0, tok.vocab_size, (1,), generator=rng))
                if r != int(clean[0, p]) and r not in special:
                    break
            x[0, p] = r
        mask = block_causal_mask(32, 8)[None, None]
        with torch.no_grad():
            for _ in range(steps):
                logits = net(x, attn_mask=mask)[0, s:e].float()
                logits[:, tok.mask_id] = -torch.inf
                prob, v = logits.softmax(-1).max(-1)
                edit = (v != x[0, s:e]) & (prob > tau)
                if not edit.any():
                    break
                x[0, s:e] = torch.where(edit, v, x[0, s:e])
        restored += int((x[0, pos] == clean[0, pos]).sum())
        total += n_corrupt
    return restored / total


def test_editing_objective_teaches_repair(tmp_path):
    corpus = write_jsonl(tmp_path / "colours.jsonl", [{"text": t} for t in pattern_lines(400, seed=0)])
    trainer = dict(max_steps=150, val_check_interval=150, limit_val_batches=1, log_every_n_steps=10)
    data = dict(seq_len=32, batch_size=16)
    procs = {}
    for name, rate in (("plain", 0.0), ("editing", 0.15)):
        cfg = fit_config(tmp_path / name, name, base=CONFIGS / "tiny" / "block_diffusion_editing_cpt.yaml",
                         trainer=trainer, data=data, train_files=[corpus], cache_dir=tmp_path / "cache",
                         model=dict(init_from=None, block_size=8, edit_rate=rate, edit_warmup_steps=0, lr=3e-3,
                                    warmup_steps=10))
        procs[name] = start_cli(["fit", "--config", cfg], tmp_path / name)
    for name, p in procs.items():
        check_ok(finish(p, timeout=600), f"{name} fit")
    plain = restore_rate(tmp_path / "plain" / "checkpoints" / "last.ckpt")
    editing = restore_rate(tmp_path / "editing" / "checkpoints" / "last.ckpt")
    print(f"restore rate: plain {plain:.2f}, editing {editing:.2f}")
    assert editing >= 0.5 and editing >= plain + 0.3, (plain, editing)
