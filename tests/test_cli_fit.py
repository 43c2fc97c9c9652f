"""`nanollada fit` end to end: every shipped config parses, tiny AR training lowers the loss, resume is exact,
checkpoints are weights-only loadable, and a malformed data line stops training with file:line.

The training runs are real ``python -m nanollada fit`` subprocesses (one intra-op thread each, two at a time on a
2-core box), with every output (logs, checkpoints, token cache) under a temporary directory.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, DATA, check_ok, finish, fit_config, scalars, start_cli, write_jsonl

ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
FLAGSHIP = CONFIGS / "ar_pretrain.yaml"

# Small and fast: ~1M-parameter tiny preset, 64-token rows, 8 rows a batch. A constant LR after warmup makes the
# schedule independent of max_steps, so a 20-step run resumed to 30 must match an uninterrupted 30-step run.
TRAINER = dict(max_steps=30, val_check_interval=15, limit_val_batches=2, log_every_n_steps=1)
MODEL = dict(warmup_steps=5, schedule="constant")
DATA_ARGS = dict(seq_len=64, batch_size=8)
CKPT = dict(every_n_train_steps=10)


# ---------------------------------------------------------------------------------------------- configs
def rel(p: Path) -> str:
    return str(p.relative_to(CONFIGS))


# Every config, by directory: the chain of stages each set holds (a new config must be added here).
CHAIN = ["ar_pretrain", "diffusion_pretrain", "block_diffusion_pretrain", "diffusion_from_ar", "block_diffusion_from_ar",
         "block_diffusion_editing_cpt", "ar_sft", "diffusion_sft", "block_diffusion_sft", "block_diffusion_editing_sft"]
REAL_CHAIN = [s for s in CHAIN if not s.endswith("diffusion_pretrain")]
DPO = ["ar_dpo", "diffusion_dpo", "block_diffusion_dpo"]  # preference tuning (issue 13): tiny, real and real/cpu
EXPECTED_CONFIGS = sorted([f"{s}.yaml" for s in CHAIN] + [f"tiny/{s}.yaml" for s in CHAIN + DPO]
                          + [f"real/{s}.yaml" for s in REAL_CHAIN + DPO] + [f"real/cpu/{s}.yaml" for s in REAL_CHAIN + DPO]
                          + ["multi_gpu/ar_pretrain_ddp.yaml", "multi_gpu/diffusion_pretrain_fsdp.yaml"])
# Parameters by hand (see tests/test_model.py): blocks + final norm, plus the tied embedding vocab x d.
BODY, WIDTH = {"tiny": 2 * 101_568 + 96, "small": 6 * 705_024 + 256, "base": 8 * 2_819_072 + 512}, \
    {"tiny": 96, "small": 256, "base": 512}
SHARED_DATA = CONFIGS.parent.parent / "shared" / "data"


def test_config_discovery():
    assert [rel(p) for p in ALL_CONFIGS] == EXPECTED_CONFIGS


@pytest.fixture(scope="module")
def config_cli():
    """One LightningCLI (run=False) whose parser instantiates every config in turn (building the parser is the slow
    part); ``instantiate(config, *overrides)`` returns it with model, datamodule, trainer and callbacks built."""
    import warnings

    from nanollada.cli import NanoLLaDACLI
    from nanollada.data.datamodule import LMDataModule
    from nanollada.lm.base import LanguageModel
    mp = pytest.MonkeyPatch()
    mp.chdir(CONFIGS.parent)  # configs name repo-relative data files, tokenizers and outputs
    mp.delenv("NANOLLADA_DATA", raising=False)
    mp.setattr("sys.argv", ["nanollada"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = NanoLLaDACLI(LanguageModel, LMDataModule, subclass_mode_model=True, run=False, save_config_callback=None,
                           args=["--config", str(CONFIGS / "tiny" / "ar_pretrain.yaml")],
                           trainer_defaults={"use_distributed_sampler": False})

    def instantiate(config, *overrides):
        cli.config = cli.parser.parse_args(["--config", str(config), *overrides])
        del cli.config_dump  # LightningCLI's hparams for save_hyperparameters come from this dump of the config
        cli._dump_config()
        with warnings.catch_warnings(), torch.device("meta"):  # weights on meta: shapes only, no init cost
            warnings.simplefilter("ignore")
            cli.instantiate_classes()
        return cli
    yield instantiate
    mp.undo()


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=[rel(p) for p in ALL_CONFIGS])
def test_config_instantiates(config, config_cli):
    """LightningCLI (run=False) builds model, data, trainer and callbacks exactly as the YAML says; an init_from
    checkpoint that does not exist (yet) is not read; data files exist (for ../shared/data: where it is present)."""
    import lightning.pytorch as pl
    source = yaml.safe_load(config.read_text())
    tr, model_cfg, data_cfg = source["trainer"], source["model"], source["data"]
    strategy = tr.get("strategy")
    fsdp_here = isinstance(strategy, dict) and strategy["class_path"].endswith("FSDPStrategy") and \
        not torch.cuda.is_available()
    # FSDP needs a CUDA accelerator: without one the trainer is built with the default strategy and the YAML's
    # FSDPStrategy (mixed precision, wrap policy, kwargs) is instantiated on its own below.
    cli = config_cli(config, *(["--trainer.strategy=auto"] if fsdp_here else []))
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    assert f"{type(model).__module__.rsplit('.', 1)[0]}.{type(model).__name__}" == model_cfg["class_path"] or \
        f"{type(model).__module__}.{type(model).__name__}" == model_cfg["class_path"]
    preset = model_cfg["init_args"]["preset"]
    assert model.model.num_params() == BODY[preset] + model.tokenizer.vocab_size * WIDTH[preset]
    assert model.tokenizer.fingerprint() == dm.tokenizer.fingerprint()  # linked: one tokenizer setting
    assert model.init_report is None  # init_from is read when a fit starts, not here
    assert trainer.max_steps == tr["max_steps"] > 0
    assert trainer.accumulate_grad_batches == tr["accumulate_grad_batches"]
    assert type(trainer.precision_plugin).__name__ == {"32-true": "Precision", "bf16-mixed": "MixedPrecision"}[
        tr["precision"]]
    if isinstance(strategy, dict) and not fsdp_here:
        assert type(trainer.strategy).__name__ == strategy["class_path"].rsplit(".", 1)[-1]
    if fsdp_here:
        from jsonargparse import ArgumentParser
        p = ArgumentParser(exit_on_error=False)
        p.add_argument("--strategy", type=pl.strategies.Strategy)
        fsdp = p.instantiate(p.parse_object({"strategy": strategy})).strategy
        assert type(fsdp).__name__ == "FSDPStrategy" and fsdp.mixed_precision_config.param_dtype == torch.bfloat16
        assert fsdp.kwargs["use_orig_params"] is True
    built = {f"{type(c).__module__}.{type(c).__name__}" for c in trainer.callbacks}
    for cb in tr["callbacks"]:
        name = cb["class_path"].rsplit(".", 1)[-1]
        assert any(b.endswith("." + name) for b in built), (cb["class_path"], built)
    assert type(trainer.logger).__name__ == tr["logger"]["class_path"].rsplit(".", 1)[-1]
    assert dm.kind == data_cfg["kind"] and dm.seq_len == data_cfg["seq_len"]
    root = data_cfg.get("data_root")
    if root is None or (root == "../shared/data" and SHARED_DATA.is_dir()):
        for f in dm.files:
            assert Path(f).is_file(), f"{rel(config)}: data file {f} does not exist"


def test_flagship_is_the_base_preset(config_cli):
    cli = config_cli(FLAGSHIP)
    from nanollada.lm import ARLM
    assert type(cli.model) is ARLM and cli.model.hparams.preset == "base"
    assert cli.model.model.num_params() == 26_747_392  # README: 26.7M with the 8k tokenizer
    assert cli.trainer.precision == "bf16-mixed"


# ---------------------------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fit")


@pytest.fixture(scope="module")
def full_and_first_part(work):
    """Run A: 30 steps uninterrupted. Run B: the same config stopped at 20 steps. Both at once."""
    cache = work / "cache"
    a = fit_config(work / "A", name="A", trainer=TRAINER, model=MODEL, data=DATA_ARGS, checkpoint=CKPT,
                   cache_dir=cache)
    b = fit_config(work / "B", name="B", trainer={**TRAINER, "max_steps": 20}, model=MODEL, data=DATA_ARGS,
                   checkpoint=CKPT, cache_dir=cache)
    # Build the shared token cache once, before two processes race for it.
    from nanollada.data.cache import build_cache
    from nanollada.tokenizer import Tokenizer
    build_cache(str(DATA / "pretrain.jsonl"), "pretrain", Tokenizer(), str(cache),
                yaml.safe_load(a.read_text())["data"]["val_fraction"], log=lambda *_: None)
    procs = [start_cli(["fit", "--config", a], cwd=work / "A"), start_cli(["fit", "--config", b], cwd=work / "B")]
    ra, rb = (finish(p, timeout=300) for p in procs)
    check_ok(ra, "30-step run")
    check_ok(rb, "20-step run")
    return {"A": work / "A", "B": work / "B", "cache": cache, "stdout": ra.stdout, "stderr": ra.stderr}


@pytest.fixture(scope="module")
def bad_data_fit(work):
    """A fit on a file whose third line is broken; started here, awaited by its test (it overlaps the resume)."""
    d = work / "bad"
    d.mkdir()
    good = [{"text": f"a fine line number {i}"} for i in range(40)]
    data = write_jsonl(d / "broken.jsonl", good[:2] + ['{"text": "no closing quote}'] + good[2:])
    cfg = fit_config(d, name="bad", trainer=TRAINER, model=MODEL, data=DATA_ARGS, train_files=[data])
    return data, start_cli(["fit", "--config", cfg], cwd=d)


@pytest.fixture(scope="module")
def resumed(full_and_first_part, bad_data_fit, work):
    """Run B2: B's checkpoints, continued with --ckpt_path last to 30 steps."""
    b2 = fit_config(work / "B", name="B2", ckpt_dir=work / "B" / "checkpoints", trainer=TRAINER, model=MODEL,
                    data=DATA_ARGS, checkpoint=CKPT, cache_dir=full_and_first_part["cache"])
    r = finish(start_cli(["fit", "--config", b2, "--ckpt_path", "last"], cwd=work / "B"), timeout=300)
    check_ok(r, "resumed run")
    return r


def test_fit_lowers_the_loss(full_and_first_part):
    log_dir = full_and_first_part["A"] / "logs" / "A" / "version_0"
    train = scalars(log_dir, "train/loss")
    assert sorted(train) == list(range(30))  # log_every_n_steps=1
    first, last = [train[s] for s in range(5)], [train[s] for s in range(25, 30)]
    assert all(math.isfinite(v) for v in train.values())
    assert math.log(8192) - 0.5 < first[0] < math.log(8192) + 0.5  # starts near uniform over the vocabulary
    assert sum(last) / 5 < sum(first) / 5 - 0.8, train
    val = scalars(log_dir, "val/loss")
    assert len(val) == 2, val  # validation at steps 15 and 30
    (s1, v1), (s2, v2) = sorted(val.items())
    assert s1 < s2 and v2 < v1 - 0.1, val
    ppl = scalars(log_dir, "val/ppl")
    assert ppl[s2] == pytest.approx(math.exp(v2), rel=1e-4)
    assert (log_dir / "config.yaml").is_file()  # the CLI saved its config next to the logs, not in the repo
    assert "[nanollada] ARLM: 0.99M parameters (tiny" in full_and_first_part["stdout"]


def test_throughput_and_lr_come_from_lightning_callbacks(full_and_first_part):
    """Tokens/s from ``nanollada.callbacks.TokenThroughputMonitor`` (Lightning's ThroughputMonitor counting tokens),
    the LR from ``LearningRateMonitor`` only: the module logs neither."""
    log_dir = full_and_first_part["A"] / "logs" / "A" / "version_0"
    tokens = scalars(log_dir, "train/lengths")  # tokens counted so far (rows x seq_len, padding included)
    assert max(tokens.values()) == 30 * DATA_ARGS["batch_size"] * DATA_ARGS["seq_len"]
    rows = scalars(log_dir, "train/samples")
    assert max(rows.values()) == 30 * DATA_ARGS["batch_size"]
    speed = scalars(log_dir, "train/device/items_per_sec")
    assert len(speed) >= 25 and all(0 < v < 1e7 for v in speed.values()), speed
    lr = scalars(log_dir, "lr-AdamW/pg1")  # warmup 5 steps then constant 3e-3 (the tiny config's peak)
    assert lr[0] == pytest.approx(3e-3 / 6) and lr[29] == pytest.approx(3e-3)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    ea.Reload()
    assert not {"train/lr", "train/tokens_per_s"} & set(ea.Tags()["scalars"])


def test_validate_and_test_write_results_json(full_and_first_part):
    """`nanollada validate|test --results_json F` write the logged metrics as JSON (what scripts/pipeline.py reads):
    run A's last checkpoint scores exactly what A logged at its final validation (step 30, same weights, same rows)."""
    A = full_and_first_part["A"]
    ckpt = A / "checkpoints" / "last.ckpt"
    procs = {sub: start_cli([sub, "--config", A / "A.yaml", "--ckpt_path", ckpt, "--trainer.logger=false",
                             "--trainer.limit_test_batches", TRAINER["limit_val_batches"],
                             "--results_json", A / f"{sub}.json"], cwd=A) for sub in ("validate", "test")}
    for sub, p in procs.items():
        check_ok(finish(p, timeout=180), sub)
    series = {k: scalars(A / "logs" / "A" / "version_0", f"val/{k}") for k in ("nll", "ppl", "tokens", "loss")}
    logged = {k: v[max(v)] for k, v in series.items()}  # the final validation
    for sub, prefix in (("validate", "val"), ("test", "test")):
        res = json.loads((A / f"{sub}.json").read_text())
        assert res["subcommand"] == sub and res["ckpt_path"] == str(ckpt)
        assert set(res["metrics"]) == {f"{prefix}/{k}" for k in logged}
        for k, v in logged.items():
            assert res["metrics"][f"{prefix}/{k}"] == pytest.approx(v, rel=1e-5), (sub, k)
    assert logged["tokens"] == TRAINER["limit_val_batches"] * DATA_ARGS["batch_size"] * DATA_ARGS["seq_len"]


def test_checkpoints_are_weights_only_loadable(full_and_first_part):
    ckpt_dir = full_and_first_part["A"] / "checkpoints"
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["last.ckpt", "step10.ckpt", "step20.ckpt", "step30.ckpt"]  # no stray temporary files
    for name, step in (("step10.ckpt", 10), ("step20.ckpt", 20), ("step30.ckpt", 30), ("last.ckpt", 30)):
        ck = torch.load(ckpt_dir / name, map_location="cpu", weights_only=True)
        assert ck["global_step"] == step
        assert ck["nanollada"]["paradigm"] == "ar" and ck["nanollada"]["model_config"]["d_model"] == 96
        assert ck["optimizer_states"] and ck["lr_schedulers"]
    from nanollada.lm.base import load_checkpoint
    loaded = load_checkpoint(str(ckpt_dir / "last.ckpt"))
    assert loaded.paradigm == "ar" and loaded.tokenizer.vocab_size == 8192 and not loaded.is_chat
    ids = torch.tensor([loaded.tokenizer.encode("床前明月光")])
    with torch.no_grad():
        assert torch.isfinite(loaded.model(ids)).all()


def test_resume_continues_exactly(full_and_first_part, resumed):
    A, B = full_and_first_part["A"], full_and_first_part["B"]
    assert "Restored all states" in resumed.stderr + resumed.stdout
    first = torch.load(B / "checkpoints" / "step20.ckpt", weights_only=True)
    assert first["global_step"] == 20
    last = torch.load(B / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 30
    full = torch.load(A / "checkpoints" / "last.ckpt", weights_only=True)
    # Same data position and optimizer state: the continued losses are the uninterrupted run's.
    a = scalars(A / "logs" / "A" / "version_0", "train/loss")
    b2 = scalars(B / "logs" / "B2" / "version_0", "train/loss")
    assert sorted(b2) == list(range(20, 30))
    for s in range(20, 30):
        assert b2[s] == pytest.approx(a[s], rel=1e-5, abs=1e-5), (s, a[s], b2[s])
    for k, v in full["state_dict"].items():
        torch.testing.assert_close(last["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    # The first 20 steps of B are A's first 20 as well (same seed and data order).
    b = scalars(B / "logs" / "B" / "version_0", "train/loss")
    assert [b[s] for s in range(20)] == pytest.approx([a[s] for s in range(20)], rel=1e-5, abs=1e-5)


def test_bad_data_line_stops_fit_with_file_and_line(bad_data_fit):
    data, proc = bad_data_fit
    r = finish(proc, timeout=300)
    assert r.returncode != 0
    assert f"{data}:3" in r.stderr, r.stderr[-3000:]
    assert not (data.parent / "checkpoints").exists()
