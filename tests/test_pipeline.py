"""scripts/pipeline.py (`nanollada pipeline`): the real-data configs are complete and consistent, derived stage configs
stay inside the run directory, the tiny profile runs end to end, and a second invocation skips every stage."""

import importlib.util
import json
import subprocess
import sys
import time

import pytest
import yaml

from conftest import CONFIGS, REPO, cli_env

PIPELINE = REPO / "scripts" / "pipeline.py"
STAGES = ("ar_pretrain", "diffusion_from_ar", "block_diffusion_from_ar", "block_diffusion_editing_cpt", "ar_sft",
          "diffusion_sft", "block_diffusion_sft", "block_diffusion_editing_sft", "ar_dpo", "diffusion_dpo",
          "block_diffusion_dpo")
INIT = {"ar_pretrain": None, "diffusion_from_ar": "ar_pretrain", "block_diffusion_from_ar": "ar_pretrain",
        "block_diffusion_editing_cpt": "block_diffusion_from_ar", "ar_sft": "ar_pretrain",
        "diffusion_sft": "diffusion_from_ar", "block_diffusion_sft": "block_diffusion_from_ar",
        "block_diffusion_editing_sft": "block_diffusion_editing_cpt", "ar_dpo": "ar_sft",
        "diffusion_dpo": "diffusion_sft", "block_diffusion_dpo": "block_diffusion_sft"}
REAL = {"gpu": (CONFIGS / "real", "real", "base", "bf16-mixed"),
        "cpu": (CONFIGS / "real" / "cpu", "real_cpu", "small", "32-true")}


def load_pipeline():
    spec = importlib.util.spec_from_file_location("pipeline_under_test", PIPELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ configs/real
@pytest.mark.parametrize("profile", sorted(REAL))
def test_real_configs(profile):
    directory, run, preset, precision = REAL[profile]
    init = INIT
    assert tuple(load_pipeline().TRAIN_STAGES) == STAGES
    for stage in STAGES:
        cfg = yaml.safe_load((directory / f"{stage}.yaml").read_text())
        tr, model, data = cfg["trainer"], cfg["model"], cfg["data"]
        assert tr["precision"] == precision and model["init_args"]["preset"] == preset
        expected_class = ("MaskedDiffusion" if stage.startswith("diffusion") else "BlockDiffusion"
                          if stage.startswith("block_diffusion") else "AR") + ("DPO" if "dpo" in stage else "LM")
        assert model["class_path"].endswith(expected_class)
        assert tr["logger"]["init_args"] == {"save_dir": f"logs/{run}", "name": stage}
        ckpt = next(cb for cb in tr["callbacks"] if cb["class_path"].endswith("ModelCheckpoint"))["init_args"]
        assert ckpt["dirpath"] == f"logs/{run}/{stage}/checkpoints" and ckpt["save_last"]
        assert tr["max_steps"] % ckpt["every_n_train_steps"] == 0  # last.ckpt holds the final step
        expected_init = f"logs/{run}/{init[stage]}/checkpoints/last.ckpt" if init[stage] else None
        assert model["init_args"]["init_from"] == expected_init
        assert data["data_root"] == "../shared/data"
        assert data["tokenizer"] == "data/tokenizer_zh_en/tokenizer.model"
        kind = "sft" if stage.endswith("sft") else "preference" if "dpo" in stage else "pretrain"
        assert data["kind"] == kind
        if kind == "preference":  # the small preference files' own split rule (../shared/data/README.md)
            assert data["val_fraction"] == 0.125 and data["train_files"] == ["pref/dpo-en.jsonl.gz",
                                                                           "pref/dpo-zh.jsonl.gz"]
            continue
        assert data["val_fraction"] == 0.0078125 == 2 / 256
        assert len(data["weights"]) == len(data["train_files"])
        assert all(f.startswith(f"{kind}/") for f in data["train_files"])
        if kind == "pretrain":
            names = {f.split("/")[1].split(".")[0] for f in data["train_files"]}
            assert names == {"en-gutenberg", "en-shakespeare", "zh-modern", "zh-novels", "zh-poetry"}
        else:
            assert len(data["train_files"]) == 3


def test_tokenizer_of_the_real_configs():
    from nanollada.tokenizer import Tokenizer
    tok = Tokenizer(REPO / "data" / "tokenizer_zh_en" / "tokenizer.model")
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.im_start_id, tok.im_end_id) == \
        (0, 1, 2, 3, 4, 5, 6)
    text = "Once upon a time, 从前有座山。\n  床前明月光 2024 ✓"
    assert tok.decode(tok.encode(text)) == text
    assert 8192 < tok.vocab_size <= 15000  # base preset stays under ~30M parameters


# ------------------------------------------------------------------------------------------------ derived configs
def test_derived_configs_stay_in_the_run(tmp_path, capsys):
    p = load_pipeline()
    argv = ["--profile", "cpu", "--logs_dir", str(tmp_path), "--run", "r", "--max_steps", "7", "--steps",
            "ar_sft=5", "--set", "data.num_workers=0", "--quiet"]
    p.main([*argv, "--dry_run"])
    out = capsys.readouterr().out
    root = tmp_path / "r"
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # a dry run writes nothing
    pipe = p.Pipeline(parse_args(p, argv))
    profile_cfgs = {s: yaml.safe_load((CONFIGS / "real" / "cpu" / f"{s}.yaml").read_text()) for s in STAGES}
    for stage in STAGES:
        # --set reaches LightningCLI as it is, after the derived config
        assert f"nanollada fit --config {root / stage / 'fit.yaml'} --data.num_workers=0" in out
        assert f"--data.num_workers=0 --results_json {root / 'validate' / stage}.json" in out
        cfg = pipe.configs[stage]
        tr = cfg["trainer"]
        steps = 5 if stage == "ar_sft" else 7  # --steps STAGE=N wins over --max_steps
        assert tr["max_steps"] == steps and tr["val_check_interval"] == steps
        assert tr["logger"]["init_args"]["save_dir"] == str(root)
        ckpts = [cb["init_args"] for cb in tr["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")]
        assert ckpts[0]["dirpath"] == str(root / stage / "checkpoints") and ckpts[0]["every_n_train_steps"] == steps
        for best in ckpts[1:]:  # top-k by a metric: its own directory, never the run's last.ckpt
            assert best["monitor"] and best["dirpath"] == str(root / stage / "checkpoints" / "best")
            assert not best.get("save_last")
        init = cfg["model"]["init_args"]["init_from"]
        assert init == (str(root / INIT[stage] / "checkpoints" / "last.ckpt") if INIT[stage] else None)
        assert cfg["data"] == profile_cfgs[stage]["data"]  # the derived YAML keeps the profile's data section
    for cmd in ("nanollada validate", "nanollada compare", "nanollada eval", "nanollada eval --generate"):
        assert cmd in out
    with pytest.raises(SystemExit, match="STAGE=N"):
        p.main([*argv, "--dry_run", "--steps", "nonsense=3"])


def parse_args(p, argv):
    """The Namespace ``p.main(argv)`` builds, without running."""
    captured = {}
    real = p.Pipeline
    p.Pipeline = lambda a: captured.setdefault("args", a) and type("NoRun", (), {"run": lambda self: None})()
    try:
        p.main(argv)
    finally:
        p.Pipeline = real
    return captured["args"]


def test_the_run_works_in_the_checkout_of_the_working_directory(tmp_path, monkeypatch):
    """``nanollada pipeline`` inside a clone reads that clone's configs and writes under its logs/."""
    p = load_pipeline()
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    (clone / "scripts" / "pipeline.py").write_text("")
    (clone / "configs").mkdir()
    monkeypatch.chdir(clone)
    assert p.find_repo(None) == clone.resolve()
    monkeypatch.chdir(tmp_path)  # not a checkout: the script's own
    assert p.find_repo(None) == p.SCRIPT_REPO
    assert p.find_repo(str(clone)) == clone.resolve()
    with pytest.raises(SystemExit, match="no configs/"):
        p.find_repo(str(tmp_path))
    args = parse_args(p, ["--profile", "cpu", "--repo", str(REPO)])
    assert args.logs_dir == str(REPO / "logs")


# ------------------------------------------------------------------------------------------------ end to end
def run_pipeline(args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=cli_env(threads=1), capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_pipeline_end_to_end_then_skips(tmp_path):
    args = ["--profile", "tiny", "--run", "t", "--logs_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"),
            "--max_steps", "4", "--limit_val_batches", "1", "--set", "trainer.num_sanity_val_steps=0",
            "--set", "trainer.log_every_n_steps=1", "--eval_limit", "2", "--quiet"]
    start = time.time()
    r = run_pipeline([str(PIPELINE), *args])
    took = time.time() - start
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = tmp_path / "t"
    import torch
    for stage in STAGES:
        marker = json.loads((root / stage / "done.json").read_text())
        assert marker["steps"] == 4
        ckpt = torch.load(root / stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 4 and ckpt["nanollada"]["paradigm"] == (
            "block_diffusion" if stage.startswith("block_diffusion") else "diffusion" if "diffusion" in stage else "ar")
        assert (root / stage / "tensorboard").is_dir()
    assert "init_from" in (root / "diffusion_from_ar" / "train.log").read_text()
    val = json.loads((root / "validate" / "validate.json").read_text())
    assert set(val) == set(STAGES)
    assert all(v["val/nll"] > 0 for s, v in val.items() if "dpo" not in s)
    assert all(0 <= v["val/reward_accuracy"] <= 1 for s, v in val.items() if "dpo" in s)
    gen = json.loads((root / "generate" / "generate.json").read_text())
    assert {r["checkpoint"] for r in gen["rows"]} >= {"ar_sft", "block_diffusion_editing_sft", "diffusion_dpo"} \
        or len({r["path"] for r in gen["rows"]}) == 7
    assert all(r.get("judge_ppl") is None or r["judge_ppl"] > 0 for r in gen["rows"])
    assert json.loads((root / "compare" / "compare.json").read_text())
    results = (root / "results.md").read_text()
    for stage in STAGES:
        row = next(line for line in results.splitlines() if line.startswith(f"| {stage} |")).split(" | ")
        tok_s, loss = row[6], row[7]  # read back from the stage's TensorBoard events
        assert float(tok_s.replace(",", "")) > 0, row
        first, last = (float(x) for x in loss.split(" → "))
        assert 0 < last < 20 and 0 < first < 20, row
    assert "## AR vs diffusion" in results and "## Data" in results and "## Generation quality" in results
    from nanollada.commands import COMMANDS
    if "eval" in COMMANDS:
        assert (root / "eval" / "eval.md").is_file()
    print(f"tiny pipeline: {took:.0f}s")

    # second invocation (through `nanollada pipeline`): every stage is skipped, nothing is run
    r2 = run_pipeline(["-m", "nanollada", "pipeline", *args], timeout=120)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    for stage in ("tokenizer", "prepare", *STAGES, "validate", "compare", "eval", "generate", "results"):
        assert f"{stage}: done" in r2.stdout, (stage, r2.stdout)
    assert "$ " not in r2.stdout

    # a stage without its marker resumes from its last checkpoint
    (root / "ar_sft" / "done.json").unlink()
    r3 = run_pipeline([str(PIPELINE), *args, "--dry_run", "--only", "ar_sft"], timeout=120)
    assert r3.returncode == 0, r3.stdout[-3000:] + r3.stderr[-3000:]
    assert f"--ckpt_path {root / 'ar_sft' / 'checkpoints' / 'last.ckpt'}" in r3.stdout
