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
STAGES = ("ar_pretrain", "diffusion_from_ar", "ar_sft", "diffusion_sft", "block_diffusion_from_ar",
          "block_diffusion_sft")
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
    init = {"ar_pretrain": None, "diffusion_from_ar": "ar_pretrain", "ar_sft": "ar_pretrain",
            "diffusion_sft": "diffusion_from_ar", "block_diffusion_from_ar": "ar_pretrain",
            "block_diffusion_sft": "block_diffusion_from_ar"}
    for stage in STAGES:
        cfg = yaml.safe_load((directory / f"{stage}.yaml").read_text())
        tr, model, data = cfg["trainer"], cfg["model"], cfg["data"]
        assert tr["precision"] == precision and model["init_args"]["preset"] == preset
        expected_class = ("MaskedDiffusionLM" if stage.startswith("diffusion") else "BlockDiffusionLM"
                          if stage.startswith("block_diffusion") else "ARLM")
        assert model["class_path"].endswith(expected_class)
        assert tr["logger"]["init_args"] == {"save_dir": f"logs/{run}", "name": stage}
        ckpt = next(cb for cb in tr["callbacks"] if cb["class_path"].endswith("ModelCheckpoint"))["init_args"]
        assert ckpt["dirpath"] == f"logs/{run}/{stage}/checkpoints" and ckpt["save_last"]
        assert tr["max_steps"] % ckpt["every_n_train_steps"] == 0  # last.ckpt holds the final step
        expected_init = f"logs/{run}/{init[stage]}/checkpoints/last.ckpt" if init[stage] else None
        assert model["init_args"]["init_from"] == expected_init
        assert data["data_root"] == "../shared/data"
        assert data["tokenizer"] == "data/tokenizer_zh_en/tokenizer.model"
        assert data["val_fraction"] == 0.0078125 == 2 / 256
        assert len(data["weights"]) == len(data["train_files"])
        kind = "sft" if stage.endswith("sft") else "pretrain"
        assert data["kind"] == kind
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
    p.main(["--profile", "cpu", "--logs_dir", str(tmp_path), "--run", "r", "--max_steps", "7", "--dry_run",
            "--set", "data.num_workers=0", "--quiet"])
    out = capsys.readouterr().out
    root = tmp_path / "r"
    profile_cfgs = {s: yaml.safe_load((CONFIGS / "real" / "cpu" / f"{s}.yaml").read_text()) for s in STAGES}
    for stage in STAGES:
        # --set reaches LightningCLI as it is, after the derived config
        assert f"nanollada fit --config {root / stage / 'fit.yaml'} --data.num_workers=0" in out
        assert f"--data.num_workers=0 --results_json {root / 'validate' / stage}.json" in out
        cfg = yaml.safe_load((root / stage / "fit.yaml").read_text())
        tr = cfg["trainer"]
        assert tr["max_steps"] == 7 and tr["val_check_interval"] == 7
        assert tr["logger"]["init_args"]["save_dir"] == str(root)
        ckpt = next(cb for cb in tr["callbacks"] if cb["class_path"].endswith("ModelCheckpoint"))["init_args"]
        assert ckpt["dirpath"] == str(root / stage / "checkpoints") and ckpt["every_n_train_steps"] == 7
        init = cfg["model"]["init_args"]["init_from"]
        assert init is None or init.startswith(str(root))
        assert cfg["data"] == profile_cfgs[stage]["data"]  # the derived YAML keeps the profile's data section
    for cmd in ("nanollada validate", "nanollada compare", "nanollada eval"):
        assert cmd in out
    assert not (root / "results.md").exists()  # a dry run writes only configs


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
    assert set(val) == set(STAGES) and all(v["val/nll"] > 0 for v in val.values())
    assert json.loads((root / "compare" / "compare.json").read_text())
    results = (root / "results.md").read_text()
    for stage in STAGES:
        row = next(line for line in results.splitlines() if line.startswith(f"| {stage} |")).split(" | ")
        tok_s, loss = row[6], row[7]  # read back from the stage's TensorBoard events
        assert float(tok_s.replace(",", "")) > 0, row
        first, last = (float(x) for x in loss.split(" → "))
        assert 0 < last < 20 and 0 < first < 20, row
    assert "## AR vs diffusion" in results and "## Data" in results
    from nanollada.commands import COMMANDS
    if "eval" in COMMANDS:
        assert (root / "eval" / "eval.md").is_file()
    print(f"tiny pipeline: {took:.0f}s")

    # second invocation (through `nanollada pipeline`): every stage is skipped, nothing is run
    r2 = run_pipeline(["-m", "nanollada", "pipeline", *args], timeout=120)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    for stage in ("tokenizer", "prepare", *STAGES, "validate", "compare", "eval", "results"):
        assert f"{stage}: done" in r2.stdout, (stage, r2.stdout)
    assert "$ " not in r2.stdout

    # a stage without its marker resumes from its last checkpoint
    (root / "ar_sft" / "done.json").unlink()
    r3 = run_pipeline([str(PIPELINE), *args, "--dry_run", "--only", "ar_sft"], timeout=120)
    assert r3.returncode == 0, r3.stdout[-3000:] + r3.stderr[-3000:]
    assert f"--ckpt_path {root / 'ar_sft' / 'checkpoints' / 'last.ckpt'}" in r3.stdout
