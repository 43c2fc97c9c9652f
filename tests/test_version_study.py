"""Paradigm.decode (the batch path of the throughput benchmarks) and benchmarks/version_study.py on random tiny
models: a batch row decodes exactly as that prompt alone, stop=False fills the canvas, and the study's tables
hold one row per version with the measured quantities."""

import importlib.util
import sys
import pytest
import torch

from conftest import REPO
from nanollada.evaluation.generation import base_settings
from nanollada.loading import LoadedModel
from nanollada.model import ModelConfig, Transformer


def tiny(tok, paradigm: str, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=96,
                      causal=paradigm == "ar")
    return LoadedModel(Transformer(cfg).eval(), tok, paradigm, f"{paradigm}.ckpt", is_chat=True,
                       paradigm_config={"block_size": 8} if paradigm == "block_diffusion" else {})


@pytest.fixture(scope="module")
def models(shipped_tokenizer):
    return {"ar_sft": tiny(shipped_tokenizer, "ar", 0), "diffusion_sft": tiny(shipped_tokenizer, "diffusion", 1),
            "block_diffusion_sft": tiny(shipped_tokenizer, "block_diffusion", 2),
            "block_diffusion_editing_sft": tiny(shipped_tokenizer, "block_diffusion", 3)}


@pytest.mark.parametrize("stage,fields", [("ar_sft", {}), ("diffusion_sft", {"strategy": "threshold"}),
                                          ("diffusion_sft", {"strategy": "low_confidence", "steps": 16}),
                                          ("block_diffusion_sft", {"strategy": "threshold"}),
                                          ("block_diffusion_sft", {"editing": "speedy"})])
def test_a_batch_row_decodes_as_the_prompt_alone(models, stage, fields):
    loaded = models[stage]
    tok = loaded.tokenizer
    prompts = [[tok.bos_id] + tok.encode(t)[:7] for t in ("The cat sat on the mat today", "Once upon a time there "
                                                                                            "was a king")]
    assert len(set(map(len, prompts))) == 1
    s = base_settings(16, **fields).resolve(loaded.interface.default_generation())
    batch = loaded.interface.decode(prompts, s, stop=False)
    for i, p in enumerate(prompts):
        alone = loaded.interface.decode([p], s, stop=False)
        assert list(batch.generated[i])[:16] == list(alone.generated[0])[:16]
    assert all(len(row) >= 16 for row in batch.generated)  # eos ignored: every row fills its canvas
    assert batch.forwards >= 1 and batch.seconds > 0


def test_version_study_tables(models, tmp_path):
    spec = importlib.util.spec_from_file_location("version_study", REPO / "benchmarks" / "version_study.py")
    vs = importlib.util.module_from_spec(spec)
    sys.modules["version_study"] = vs  # dataclasses look their module up
    spec.loader.exec_module(vs)
    vers = vs.versions(0.9)
    assert [v.stage for v in vers] == ["ar_sft", "diffusion_sft", "block_diffusion_sft",
                                       "block_diffusion_editing_sft", "block_diffusion_editing_sft"]
    lc = vs.settings_for(vers[1], 12, models["diffusion_sft"])
    assert (lc.strategy, lc.steps, lc.temperature) == ("low_confidence", 12, 0.0)  # one token per step, greedy
    assert vs.settings_for(vers[4], 12, models["block_diffusion_editing_sft"]).editing_thresholds() == (0.7, 0.5)
    quality = vs.measure_quality(models, vers, ["Hello there", "你好"], 8, models["ar_sft"])
    tok = models["ar_sft"].tokenizer
    prompts = [[tok.bos_id] + list(range(10, 17)) for _ in range(2)]
    speed = vs.measure_speed(models, vers, prompts, 8, [1, 2], repeats=1)
    assert len(quality) == 5 and len(speed) == 10
    for r in quality:
        assert r["prompts"] == 2 and 0 <= r["rep4"] <= 1 and r["judge_ppl"] > 0 and len(r["samples"]) == 2
    for r in speed:
        assert r["tokens"] == 8 * r["batch"] and r["tokens_per_s"] > 0 and r["tpf"] > 0
        if r["version"].startswith("AR") or "low-confidence" in r["version"]:
            assert r["tpf"] == pytest.approx(1.0, abs=0.2)  # one token per forward (AR: + the prompt forward)
    md = vs.markdown({"quality": quality, "speed": speed})
    assert md.count("\n| ") >= 5 and "tok/s b2" in md and "2.1 editing, speedy" in md
