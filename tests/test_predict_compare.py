"""`nanollada predict` (quick form and LightningCLI form) and `nanollada compare` through the real CLI on tiny
checkpoints trained for a few steps; the paradigm and strategy registries."""

import json
import re
import typing
from pathlib import Path

import pytest

from conftest import CONFIGS, DATA, REPO, finish, fit_config, run_cli, start_cli

STEPS = dict(max_steps=6, val_check_interval=6, limit_val_batches=1, log_every_n_steps=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny AR pretrain checkpoint and a tiny diffusion SFT checkpoint, trained side by side."""
    work = tmp_path_factory.mktemp("predict")
    ar_cfg = fit_config(work / "ar", "ar", trainer=STEPS, data=dict(seq_len=64, batch_size=4))
    dm_cfg = fit_config(work / "dm", "dm", base=CONFIGS / "tiny" / "diffusion_sft.yaml", trainer=STEPS,
                        train_files=[DATA / "sft.jsonl"], model=dict(init_from=None),
                        data=dict(seq_len=128, batch_size=4, max_val_rows=4))
    procs = [start_cli(["fit", "--config", c], work) for c in (ar_cfg, dm_cfg)]
    for p in procs:
        r = finish(p, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    return work, work / "ar" / "checkpoints" / "last.ckpt", work / "dm" / "checkpoints" / "last.ckpt"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_predict_writes_jsonl_and_is_deterministic_under_a_seed(checkpoints):
    work, ar, _ = checkpoints
    outs = []
    for seed, name in ((7, "a"), (7, "b"), (8, "c")):
        out = work / f"{name}.jsonl"
        r = run_cli(["predict", "--ckpt", ar, "--prompt", "Once upon a time", "--prompt", "从前有座山",
                     "--max_new_tokens", "12", "--temperature", "1.0", "--seed", str(seed), "--output", out], work)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(read_jsonl(out))
    a, b, c = outs
    assert [x["prompt"] for x in a] == ["Once upon a time", "从前有座山"]
    from nanollada.tokenizer import Tokenizer
    tok = Tokenizer()
    for rec, prompt in zip(a, ["Once upon a time", "从前有座山"]):
        # a pretraining checkpoint: plain continuation (bos + text), one KV-cache forward per sampled token
        assert rec["prompt_tokens"] == 1 + len(tok.encode(prompt))
        assert rec["forwards"] == rec["generated_tokens"] and rec["tokens"] <= rec["generated_tokens"] <= 12
        assert rec["seconds"] > 0 and rec["completion"] == tok.decode(tok.encode(rec["completion"]))
    assert [x["completion"] for x in a] == [x["completion"] for x in b]
    assert [x["completion"] for x in a] != [x["completion"] for x in c]


def test_predict_diffusion_with_trace_and_prefix_cache(checkpoints):
    work, _, dm = checkpoints
    out, trace = work / "d.jsonl", work / "trace.html"
    r = run_cli(["predict", "--ckpt", dm, "--prompt", "Name three colours.", "--max_new_tokens", "16",
                 "--block_length", "8", "--strategy", "threshold", "--use_prefix_cache", "true",
                 "--trace", trace, "--output", out], work)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = read_jsonl(out)[0]
    assert rec["paradigm"] == "diffusion" and rec["generated_tokens"] == 16 and rec["forwards"] >= 1
    assert len(rec["steps_per_block"]) == 2  # 16 tokens in blocks of 8
    from nanollada.tokenizer import Tokenizer
    assert rec["prompt_tokens"] == len(Tokenizer().chat_prompt("Name three colours."))  # SFT: the chat template
    # threshold decoding commits >= 1 token per forward: at most one forward per canvas position (fewer after eos)
    assert 1 <= rec["forwards"] <= 16 and sum(rec["steps_per_block"]) == rec["forwards"]
    assert f"</button> step <span id=\"i\">0</span> / {rec['forwards']}<" in trace.read_text(encoding="utf-8")
    assert "<html" in trace.read_text(encoding="utf-8")


def test_predict_rejects_bad_prompts_with_clear_errors(checkpoints):
    work, ar, _ = checkpoints
    bad = work / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    for args, message in ((["--prompt", "   "], "empty"), (["--prompts_file", bad], "bad.txt:2: not valid UTF-8"),
                          (["--prompts_file", work / "missing.txt"], "not found"), ([], "no prompts")):
        r = run_cli(["predict", "--ckpt", ar, *args], work)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = run_cli(["predict", "--ckpt", work / "nope.ckpt", "--prompt", "x"], work)
    assert r.returncode != 0 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_prompt_files_are_read_by_the_one_jsonl_reader(tmp_path):
    """.jsonl/.jsonl.gz prompts go through ``records.read_jsonl`` (file:line errors, gzip); text files give
    one prompt per non-blank line."""
    import gzip

    from nanollada.prediction import read_prompts
    good = tmp_path / "p.jsonl.gz"
    with gzip.open(good, "wt", encoding="utf-8") as fh:
        fh.write('{"prompt": "one"}\n\n{"prompt": "二", "extra": 1}\n')
    assert read_prompts(["cli"], str(good)) == ["cli", "one", "二"]
    (tmp_path / "t.txt").write_text("a b\n\n  c\n", encoding="utf-8")
    assert read_prompts([], str(tmp_path / "t.txt")) == ["a b", "  c"]
    for body, where in (('{"prompt": "ok"}\n{"text": "x"}\n', ":2: "), ('{"prompt": 3}\n', ":1: "),
                        ('{"prompt": "ok"}\n[1, 2]\n', ":2: "), ('not json\n', ":1: ")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body, encoding="utf-8")
        with pytest.raises(ValueError, match=f"bad.jsonl{where}"):
            read_prompts([], str(bad))


def test_compare_runs_both_paradigms_through_the_cli(checkpoints):
    work, ar, dm = checkpoints
    out = work / "compare.json"
    r = run_cli(["compare", "--ar", ar, "--diffusion", dm, "--prompt", "Tell me a story.", "--max_new_tokens", "16",
                 "--block_length", "8", "--strategies", "[low_confidence, threshold, threshold_topk]",
                 "--output", out], work)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    runs = [s["run"] for s in result["summary"]]
    assert runs == ["ar", "diffusion/low_confidence", "diffusion/threshold", "diffusion/threshold_topk"]
    lowconf = result["summary"][1]
    # fixed steps: at most one forward per canvas token (2 blocks x 8), fewer when eos ends the answer early
    assert 1 <= lowconf["forwards"] <= 16
    assert all(s["seconds"] > 0 and s["first_token_s"] > 0 for s in result["summary"])
    assert "| run |" in r.stdout and "diffusion/threshold" in r.stdout
    # any paradigms, any order: the runs follow the checkpoints
    out2 = work / "compare2.json"
    r = run_cli(["compare", "--ckpt", f"[{dm}, {ar}]", "--prompt", "x", "--max_new_tokens", "8", "--block_length",
                 "8", "--strategies", "[threshold]", "--output", out2], work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s["run"] for s in json.loads(out2.read_text())["summary"]] == ["diffusion/threshold", "ar"]
    bogus = run_cli(["compare", "--ckpt", f"[{dm}]", "--prompt", "x", "--strategies", "[bogus]"], work)
    assert bogus.returncode != 0 and "unknown diffusion strategy 'bogus'" in bogus.stderr
    assert "Traceback" not in bogus.stderr


@pytest.mark.parametrize("which", ["ar", "dm"])
def test_lightning_predict_writes_prompt_order_and_matches_the_quick_form(checkpoints, which):
    """`nanollada predict --config --ckpt_path --data.predict_file --output` runs Trainer.predict; its records are
    in input order and equal the quick form's (the same code underneath) with the same settings."""
    work, ar, dm = checkpoints
    ckpt, config = (ar, work / "ar" / "ar.yaml") if which == "ar" else (dm, work / "dm" / "dm.yaml")
    prompts = ["Name three colours.", "从前有座山", "Tell me a story.", "Why is the sky blue?", "Count to five."]
    pfile = work / f"prompts_{which}.txt"
    pfile.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = work / f"lightning_{which}.jsonl"
    gen = ["--generation.max_new_tokens", "8", "--generation.temperature", "0.8", "--generation.seed", "3",
           "--generation.block_length", "8"]
    r = run_cli(["predict", "--config", config, "--ckpt_path", ckpt, "--data.predict_file", pfile,
                 "--data.batch_size", "2", "--output", out, *gen], work)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_jsonl(out)
    assert [x["index"] for x in recs] == list(range(len(prompts))) and [x["prompt"] for x in recs] == prompts
    quick_out = work / f"quick_{which}.jsonl"
    q = run_cli(["predict", "--ckpt", ckpt, "--prompts_file", pfile, "--output", quick_out,
                 *[a.replace("--generation.", "--") for a in gen]], work)
    assert q.returncode == 0, q.stderr[-3000:]
    assert [x["completion"] for x in recs] == [x["completion"] for x in read_jsonl(quick_out)]
    assert not list(work.glob(f".lightning_{which}.jsonl*"))  # part files merged and removed


def test_lightning_predict_help_explains_generation_settings(checkpoints):
    work, _, _ = checkpoints
    r = run_cli(["predict", "--config", work / "dm" / "dm.yaml", "--help"], work)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--generation.temperature", "--generation.strategy", "--generation.threshold", "--output",
                 "--data.predict_file"):
        assert flag in r.stdout, flag
    assert "Fast-dLLM" in r.stdout  # the field docs become the help text
    # --print_config shows the resolved generation settings with a command-line override applied
    r = run_cli(["predict", "--config", work / "dm" / "dm.yaml", "--generation.threshold", "0.75",
                 "--print_config"], work)
    assert r.returncode == 0, r.stderr[-2000:]
    import yaml
    cfg = yaml.safe_load(r.stdout)
    assert cfg["generation"]["threshold"] == 0.75 and "strategy" in cfg["generation"]
    assert cfg["model"]["class_path"] == "nanollada.lm.MaskedDiffusionLM"


@pytest.mark.parametrize("flag,value,allowed", [("top_p", 1.5, "(0, 1]"), ("threshold", 2.0, "[0, 1]"),
                                                ("max_new_tokens", 0, ">= 1"), ("temperature", -1.0, ">= 0"),
                                                ("block_length", 0, ">= 1"), ("steps", 0, ">= 1"),
                                                ("top_k", 0, ">= 1"), ("repetition_penalty", 0.0, "> 0"),
                                                ("budget", 0, ">= 1"), ("commit_top_k", 0, ">= 1")])
def test_meaningless_generation_settings_are_refused(flag, value, allowed):
    from nanollada.generate import GenerationSettings
    with pytest.raises(ValueError, match=re.escape(f"--{flag} {value!r} is out of range: allowed {allowed}")):
        GenerationSettings(**{flag: value})


def test_cli_names_the_bad_flag_without_a_traceback(checkpoints):
    work, ar, _ = checkpoints
    r = run_cli(["predict", "--ckpt", ar, "--prompt", "x", "--top_p", "1.5"], work)
    assert r.returncode != 0 and "--top_p 1.5 is out of range: allowed (0, 1]" in r.stderr
    assert "Traceback" not in r.stderr


def test_strategy_registry_matches_the_settings_choices():
    from nanollada.generate import GenerationSettings
    from nanollada.sampling.diffusion import STRATEGIES, build_strategy
    literal, none = typing.get_args(typing.get_type_hints(GenerationSettings)["strategy"])  # or None: the default
    assert set(typing.get_args(literal)) == set(STRATEGIES) and none is type(None)
    s = GenerationSettings(strategy="threshold_topk", threshold=0.7, commit_top_k=3, budget=9)
    built = build_strategy("threshold_topk", s, 8)
    assert (type(built).__name__, built.threshold, built.top_k, built.budget) == ("ThresholdTopKBudget", 0.7, 3, 9)
    assert build_strategy("low_confidence", GenerationSettings(steps=None), 8).steps == 8
    with pytest.raises(ValueError, match="unknown diffusion strategy"):
        build_strategy("bogus", s, 8)


def test_only_the_registry_knows_paradigm_names():
    """No module outside nanollada/paradigms branches on paradigm names or LightningModule classes (a new paradigm is
    a new class): no ``== "ar"``, ``paradigm !=``, ``in ("ar", ...)`` or ``isinstance(m, ARLM)``."""
    names = r'"(?:ar|diffusion|block_diffusion)"'
    pattern = re.compile(rf'(?:==|!=)\s*{names}|{names}\s*(?:==|!=)|paradigm\s*(?:==|!=)|\bin\s*[(\[{{]\s*{names}'
                         r'|isinstance\([^)]*\b(?:ARLM|MaskedDiffusionLM|BlockDiffusionLM|ARDPO)\b')
    for line in ('if p == "ar":', 'paradigm != x', 'if kind in ("diffusion", "ar"):', 'isinstance(m, ARLM)'):
        assert pattern.search(line), line  # the pattern catches each form it is meant to
    hits = [f"{p}:{i}" for root in ("nanollada", "benchmarks", "scripts") for p in sorted((REPO / root).rglob("*.py"))
            if "paradigms" not in p.parts for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
