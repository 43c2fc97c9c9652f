"""The lm-evaluation-harness adapter, offline: local task YAMLs over local JSON files (one multiple-choice, one
rolling-perplexity, one generation task) scored through lm-eval and checked against `nanollada eval` on the same
items (equal for AR; for diffusion within Monte-Carlo error -- the same estimator on the same draws, so equal here
too), stop sequences, and the `nanollada lm-eval` wrapper end to end. Random/crafted tiny models, no training."""

import json
import math
import os

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import run_cli, write_jsonl  # noqa: E402
from nanollada.evaluation.lm_eval_adapter import NanoLLaDALM, evaluate, lm_eval_argv  # noqa: E402
from nanollada.evaluation.runner import EvalSettings, choice_pairs, evaluate_task  # noqa: E402
from nanollada.evaluation.tasks import Task, load_task_file, resolve_task  # noqa: E402
from nanollada.loading import LoadedModel, load_checkpoint  # noqa: E402
from nanollada.model import ModelConfig, Transformer  # noqa: E402
from test_eval import crafted  # noqa: E402

OFFLINE = dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

MC = [{"context": "Once upon a time", "choices": [" a cat", " the dog ran", " there was"], "gold": 1},
      {"query": "What is the capital of France?", "choices": ["Paris", "Rome"], "gold": 0},
      {"context": "The weather today is", "choices": [" sunny", " rainy"], "gold": 0}]
DOCS = [("the quick brown fox jumps over the lazy dog while the models learn tokens from data " * 3).strip(),
        "a second, shorter document\nwith two lines"]  # as the .txt splitter gives them back (stripped)
CLOZE = [{"context": "He looked at", "continuation": " the the"}, {"context": "She saw", "continuation": " dog dog"}]

YAML = {
    "nl_mc": """task: nl_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc_lm.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""",
    "nl_roll": """task: nl_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/docs.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "nl_gen": """task: nl_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/cloze.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 2
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, shipped_tokenizer):
    """Task YAMLs and their JSON data, plus the same items as `nanollada eval` task files."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    os.environ.update(OFFLINE, HF_HOME=str(d / "hf"))
    tok = shipped_tokenizer
    rows = []  # lm-eval sees each item's prompt and choices exactly as `nanollada eval` builds them
    for it in MC:
        (ctx, _), *_ = choice_pairs(tok, it)
        prompt = tok.decode(ctx[1:])
        delim = " " if "query" in it else ""
        rows.append({"prompt": prompt, "choices": [delim + c for c in it["choices"]], "gold": it["gold"]})
    write_jsonl(d / "mc_lm.jsonl", rows)
    write_jsonl(d / "mc.jsonl", MC)
    write_jsonl(d / "docs.jsonl", [{"text": t} for t in DOCS])
    (d / "docs.txt").write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    write_jsonl(d / "cloze.jsonl", CLOZE)
    for name, text in YAML.items():
        (d / f"{name}.yaml").write_text(text.format(data=d), encoding="utf-8")
    return d


def tiny(tok, causal: bool, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32,
                      causal=causal)
    return LoadedModel(Transformer(cfg).eval(), tok, "ar" if causal else "diffusion", "tiny")


def write_checkpoint(path, loaded: LoadedModel):
    """A checkpoint file in the format LanguageModel.on_save_checkpoint writes (what load_checkpoint reads)."""
    tok = loaded.tokenizer
    torch.save({"state_dict": {f"model.{k}": v for k, v in loaded.model.state_dict().items()},
                "nanollada": {"paradigm": loaded.paradigm, "model_config": loaded.model.cfg.to_dict(),
                              "data_kind": "pretrain",
                              "tokenizer_model": torch.frombuffer(bytearray(tok.model_bytes), dtype=torch.uint8)}},
               path)
    return path


def test_lm_eval_argv_adds_the_model_and_the_run_subcommand(shipped_tokenizer):
    assert lm_eval_argv(["--tasks", "x"]) == ["run", "--model", "nanollada", "--tasks", "x"]
    assert lm_eval_argv(["run", "--tasks", "x"]) == ["run", "--model", "nanollada", "--tasks", "x"]
    assert lm_eval_argv(["--model", "hf", "--tasks", "x"]) == ["run", "--model", "hf", "--tasks", "x"]
    assert lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks"]
    with pytest.raises(ValueError, match="unknown nanollada model_args"):
        NanoLLaDALM(loaded=tiny(shipped_tokenizer, True), bogus=1)
    with pytest.raises(ValueError, match="ckpt=PATH"):
        NanoLLaDALM()


@pytest.mark.parametrize("causal", [True, False])
def test_lm_eval_numbers_match_nanollada_eval(task_dir, shipped_tokenizer, causal):
    tok = shipped_tokenizer
    loaded = tiny(tok, causal)
    s = EvalSettings(batch_size=4, samples=4, seed=0)
    lm = NanoLLaDALM(loaded=loaded, batch_size=4, samples=4, seed=0)
    out = evaluate(lm, ["nl_mc", "nl_roll"], include_path=str(task_dir), include_defaults=False, log_samples=True)
    res = out["results"]

    # multiple choice: every choice's log-likelihood equals nanollada's (AR exact; diffusion the same estimator on
    # the same shared draws), so the accuracies agree
    mine = evaluate_task(loaded, load_task_file(str(task_dir / "mc.jsonl")), s)
    theirs = [[float(r[0][0]) for r in smp["resps"]] for smp in sorted(out["samples"]["nl_mc"],
                                                                       key=lambda x: x["doc_id"])]
    pairs, owner = [], []
    for i, it in enumerate(MC):
        for p in choice_pairs(tok, it):
            pairs.append(p)
            owner.append(i)
    lp, _ = loaded.interface.conditional_logprob([c for c, _ in pairs], [t for _, t in pairs], s, groups=owner)
    flat = [v for row in theirs for v in row]
    tol = dict(rel=1e-5, abs=1e-4) if causal else dict(rel=0.02, abs=0.05)  # diffusion: within Monte-Carlo error
    assert flat == pytest.approx(lp.tolist(), **tol)
    assert res["nl_mc"]["acc,none"] == pytest.approx(mine["accuracy"])

    # rolling perplexity: word / byte perplexity and bits per byte of the same documents from a .txt file
    roll = evaluate_task(loaded, resolve_task(str(task_dir / "docs.txt")), s)
    assert roll["windowed"] == 1  # the first document is longer than max_seq_len=32: windows on both sides
    tol = dict(rel=1e-5) if causal else dict(rel=0.05)
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert res["nl_roll"][f"{key},none"] == pytest.approx(roll[key], **tol), key
    assert lm.estimate == roll["estimate"]


@pytest.mark.parametrize("causal", [True, False])
def test_generate_until_matches_the_cloze_decoder_and_honours_stop_sequences(task_dir, shipped_tokenizer, causal):
    tok = shipped_tokenizer
    loaded = crafted(tok, tok.encode(" the"), causal)  # always " the"
    lm = NanoLLaDALM(loaded=loaded, strategy="low_confidence", use_prefix_cache=False, block_length=8)
    out = evaluate(lm, ["nl_gen"], include_path=str(task_dir), include_defaults=False)
    mine = evaluate_task(loaded, load_task_file(str(task_dir / "cloze.jsonl")), EvalSettings(batch_size=2),
                         strategies=["low_confidence"])
    assert out["results"]["nl_gen"]["exact_match,none"] == 0.5
    assert list(mine["decoders"].values())[0]["exact_match"] == 0.5 == mine["exact_match"]

    # stop sequences: cut before the first one, and decoding stops as soon as it appears
    calls = []
    hook = loaded.model.register_forward_hook(lambda *a: calls.append(1))

    class Req:
        def __init__(self, args):
            self.args = args
    texts = lm.generate_until([Req(("Once", {"until": ["the the"], "max_gen_toks": 24})),
                               Req(("Once", {"until": ["zebra"], "max_gen_toks": 3}))])
    hook.remove()
    assert texts == [" ", " the the the"]
    assert len(calls) < 24  # the first request stopped early


def test_nanollada_lm_eval_cli_passes_lm_eval_flags_through(task_dir, shipped_tokenizer, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ar.ckpt", tiny(shipped_tokenizer, True))
    out_dir = tmp_path / "out"
    r = run_cli(["lm-eval", "--model_args", f"ckpt={ckpt},samples=2", "--batch_size", "4", "--tasks", "nl_mc",
                 "--include_path", task_dir, "--local_tasks_only", "--limit", "2", "--output_path", out_dir],
                tmp_path, threads=1, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    files = list(out_dir.rglob("results_*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert result["config"]["model"] == "nanollada" and result["config"]["limit"] == 2
    acc = result["results"]["nl_mc"]["acc,none"]
    loaded = load_checkpoint(str(ckpt))
    mine = evaluate_task(loaded, Task("mc", "multiple_choice", "x", MC[:2]), EvalSettings(batch_size=4))
    assert acc == pytest.approx(mine["accuracy"]) and math.isfinite(acc)
    assert "nl_mc" in r.stdout  # lm-eval's own results table
