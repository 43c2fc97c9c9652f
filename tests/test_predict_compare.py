"""`nanollada predict` and `nanollada compare` through the real CLI on tiny checkpoints trained for a few steps."""

import json

import pytest

from conftest import CONFIGS, DATA, finish, fit_config, run_cli, start_cli

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
    for rec in a:
        assert rec["tokens"] >= 0 and rec["seconds"] > 0 and rec["forwards"] >= 1 and isinstance(rec["completion"], str)
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
    assert rec["prompt_tokens"] > len("Name three colours.".split())  # the SFT checkpoint got the chat template
    assert "<html" in trace.read_text(encoding="utf-8")


def test_predict_rejects_bad_prompts_with_clear_errors(checkpoints):
    work, ar, _ = checkpoints
    bad = work / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    for args, message in ((["--prompt", "   "], "empty"), (["--prompts_file", bad], "not valid UTF-8"),
                          (["--prompts_file", work / "missing.txt"], "not found"), ([], "no prompts")):
        r = run_cli(["predict", "--ckpt", ar, *args], work)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = run_cli(["predict", "--ckpt", work / "nope.ckpt", "--prompt", "x"], work)
    assert r.returncode != 0 and "not found" in r.stderr and "Traceback" not in r.stderr


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
    swapped = run_cli(["compare", "--ar", dm, "--diffusion", ar, "--prompt", "x"], work)
    assert swapped.returncode != 0 and "AR checkpoint" in swapped.stderr
