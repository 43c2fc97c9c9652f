"""`nanollada eval --generate`: prompts from every source, the quality metrics on known inputs, the sweep (one curve
per checkpoint and strategy, ignored settings run once), the JSON table and the PNG (and its absence without
matplotlib). Random tiny models, no training."""

import builtins
import json
import math

import pytest
import torch

from conftest import write_jsonl
from nanollada.data.records import DataError
from nanollada.evaluation.generation import (base_settings, format_sweep, load_prompts, parse_sweep, plot_sweep,
                                             repeated_ngrams, run_sweep, score_run, text_prefix, unigram_entropy)
from nanollada.loading import LoadedModel
from nanollada.model import ModelConfig, Transformer
from nanollada.paradigms.base import ScoringSettings


def tiny(tok, causal: bool, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64,
                      causal=causal)
    return LoadedModel(Transformer(cfg).eval(), tok, "ar" if causal else "diffusion",
                       "ar.ckpt" if causal else "dm.ckpt")


def test_quality_metrics_on_known_inputs():
    assert unigram_entropy([]) == 0.0 and unigram_entropy([5, 5, 5]) == 0.0
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(2.0)
    assert repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4, 1]) == (2, 6)  # (1,2,3,4) and (2,3,4,1) come back
    assert repeated_ngrams([1, 2, 3]) == (0, 0) and repeated_ngrams(list(range(10))) == (0, 7)
    assert text_prefix("one two three four five", 16) == "one two three" and text_prefix("short", 50) == "short"


def test_sweep_and_settings_parsing():
    assert parse_sweep(["threshold=0.5,0.9", "steps=4,none", "strategy=threshold"]) == {
        "threshold": [0.5, 0.9], "steps": [4, None], "strategy": ["threshold"]}
    with pytest.raises(ValueError, match="not a generation setting"):
        parse_sweep(["thresold=0.5"])
    with pytest.raises(ValueError, match="FIELD=V1,V2"):
        parse_sweep(["threshold"])
    s = base_settings(16, threshold=0.7)
    assert (s.max_new_tokens, s.temperature, s.top_p, s.repetition_penalty, s.threshold) == (16, 0.0, 1.0, 1.0, 0.7)


def test_prompts_from_every_source(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    assert load_prompts(str(txt))[0] == ["first prompt", "second prompt"]
    pj = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(10)])
    assert load_prompts(str(pj), limit=3)[0] == ["q0", "q3", "q6"]  # spread evenly
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": [{"role": "user", "content": "hi there"},
                                                                  {"role": "assistant", "content": "hello"}]}])
    prompts, where = load_prompts(str(sft))
    assert prompts == ["hi there"] and "first user turns" in where
    pre = write_jsonl(tmp_path / "pre.jsonl", [{"text": "word " * 100}])
    prompts, where = load_prompts(str(pre), prefix_chars=22)
    assert prompts == ["word word word word"] and "pretraining" in where
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"question": "no"}])
    with pytest.raises(DataError, match=rf"^{bad}:2: "):
        load_prompts(str(bad))
    with pytest.raises(DataError, match="not found"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_heldout_sft_prompts_are_the_validation_conversations(tmp_path):
    """``sft:<file>`` keeps exactly the conversations the SFT split rule holds out of training."""
    from nanollada.data.records import SHARED_VAL_FRACTION, is_validation
    convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(2000)]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in convs])
    held = [c[0]["content"] for c in convs if is_validation(c[0]["content"], SHARED_VAL_FRACTION)]
    assert 0 < len(held) < 60  # ~2000/128
    prompts, where = load_prompts(f"sft:{path}")
    assert prompts == held and "held-out" in where
    assert load_prompts(f"sft:{path}", limit=2)[0] == [held[0], held[len(held) // 2]]
    train_only = [{"conversations": c} for c in convs if c[0]["content"] not in held][:5]
    with pytest.raises(DataError, match="no held-out"):
        load_prompts(f"sft:{write_jsonl(tmp_path / 'train.jsonl', train_only)}")


def test_sweep_runs_one_curve_per_checkpoint_and_strategy(shipped_tokenizer, tmp_path):
    tok = shipped_tokenizer
    ar, dm = tiny(tok, True), tiny(tok, False)
    prompts = ["The cat sat on", "Once upon a time"]
    grid = parse_sweep(["threshold=0.5,0.9", "steps=2,4", "block_length=4,8"])
    result = run_sweep([ar, dm], ["ar", "dm"], prompts, base_settings(8), ["low_confidence", "threshold"], grid,
                       judge=ar, scoring=ScoringSettings(batch_size=4), log=lambda m: None)
    curves = {}
    for r in result["rows"]:
        curves.setdefault(r["curve"], []).append(r["point"])
    # AR ignores every swept field: one point; low_confidence ignores threshold, threshold ignores steps
    assert {k: len(v) for k, v in curves.items()} == {"ar ar": 1, "dm diffusion/low_confidence": 4,
                                                      "dm diffusion/threshold": 4}
    assert {(p["steps"], p["block_length"]) for p in curves["dm diffusion/low_confidence"]} == {
        (2, 4), (2, 8), (4, 4), (4, 8)}
    assert {(p["threshold"], p["block_length"]) for p in curves["dm diffusion/threshold"]} == {
        (0.5, 4), (0.5, 8), (0.9, 4), (0.9, 8)}
    for r in result["rows"]:
        assert r["prompts"] == 2 and r["tokens_per_s"] > 0 and 0 <= r["rep4"] <= 1 and r["unigram_entropy"] >= 0
        assert r["judge_ppl"] is None or math.isfinite(r["judge_ppl"])
        if r["paradigm"] == "ar":
            assert r["tpf"] <= 1.0
    lc = {(p["steps"], p["block_length"]): r["forwards"] for r in result["rows"]
          for p in [r["point"]] if r["run"] == "diffusion/low_confidence"}
    assert lc[(2, 8)] < lc[(4, 8)]  # fewer steps per block, fewer forwards
    table = format_sweep(result)
    assert "| dm diffusion/threshold | threshold=0.5, block_length=4 |" in table and "| ar ar | default |" in table
    png = plot_sweep(result, str(tmp_path / "sweep.png"))
    pytest.importorskip("matplotlib")
    assert png and (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_guidance_eos_rules_and_editing_are_swept_not_merged(shipped_tokenizer):
    """cfg_scale, min_new_tokens and eos_after_text change diffusion decoding (one run per value) and not AR's;
    the editing presets change block diffusion's (each preset's thresholds are its own run)."""
    from dataclasses import replace
    tok = shipped_tokenizer
    ar, dm = tiny(tok, True), tiny(tok, False)
    bd = replace(tiny(tok, False, seed=1), paradigm="block_diffusion", path="bd.ckpt",
                 paradigm_config={"block_size": 4})
    base = base_settings(8, block_length=4)
    for field, values in (("cfg_scale", [0.0, 1.5]), ("min_new_tokens", [0, 4]), ("eos_after_text", [False, True])):
        for loaded, want in ((ar, 1), (dm, 2), (bd, 2)):
            keys = {loaded.interface.decoding_key(replace(base, strategy="threshold", **{field: v})) for v in values}
            assert len(keys) == want, (field, loaded.paradigm)
    keys = {bd.interface.decoding_key(replace(base, strategy="threshold", editing=e))
            for e in ("off", "speedy", "quality")}
    assert len(keys) == 3
    result = run_sweep([bd], ["bd"], ["The cat sat on"], base, ["threshold"], parse_sweep(["editing=off,speedy"]),
                       log=lambda m: None)
    assert [r["point"] for r in result["rows"]] == [{"editing": "off"}, {"editing": "speedy"}]


def test_plot_is_skipped_with_a_message_without_matplotlib(monkeypatch, tmp_path, capsys):
    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = {"prompts": 1, "rows": [{"curve": "x", "point": {}, "tokens_per_s": 1.0, "rep4": 0.0}]}
    assert plot_sweep(result, str(tmp_path / "x.png")) is None
    assert "matplotlib is not installed" in capsys.readouterr().out and not (tmp_path / "x.png").exists()


def test_score_run_counts_empty_completions(shipped_tokenizer):
    loaded = tiny(shipped_tokenizer, True)
    recs = [{"prompt": "a", "completion": "", "tokens": 0, "forwards": 1, "seconds": 0.1},
            {"prompt": "b", "completion": "x y x y x y", "tokens": 6, "forwards": 6, "seconds": 0.1}]
    r = score_run(loaded, recs, judge=loaded, scoring=ScoringSettings())
    assert r["empty"] == 1 and r["mean_tokens"] == 3 and r["tpf"] == 6 / 7 and r["judge_tokens"] > 0


def test_cli_generate_writes_the_table_json_and_png(shipped_tokenizer, tmp_path, capsys):
    from nanollada.cli import main
    from test_lm_eval import write_checkpoint
    ar = write_checkpoint(tmp_path / "ar.ckpt", tiny(shipped_tokenizer, True))
    dm = write_checkpoint(tmp_path / "dm.ckpt", tiny(shipped_tokenizer, False))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sat on\nOnce upon a time\n", encoding="utf-8")
    out, png = tmp_path / "gen.json", tmp_path / "gen.png"
    main(["eval", "--generate", "--ckpt", str(ar), str(dm), "--judge", str(ar), "--prompts", str(prompts),
          "--max_new_tokens", "8", "--strategies", "threshold", "--sweep", "threshold=0.5,0.9",
          "--set", "block_length=8", "--output", str(out), "--plot", str(png), "--device", "cpu"])
    table = capsys.readouterr().out
    assert "| ar.ckpt ar | default |" in table and "| dm.ckpt diffusion/threshold | threshold=0.9 |" in table
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 3 and result["judge"] == str(ar) and result["settings"]["block_length"] == 8
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="give --prompts"):
        main(["eval", "--generate", "--ckpt", str(ar)])
    with pytest.raises(SystemExit, match="not a generation setting"):
        main(["eval", "--generate", "--ckpt", str(ar), "--prompts", str(prompts), "--sweep", "bogus=1"])
