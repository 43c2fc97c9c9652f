"""Shared fixtures: a tiny trained tokenizer, small jsonl writers, a fit-config writer and a CLI runner."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

# Tiny models on a small, shared CPU box: one intra-op thread avoids OpenMP spin-waiting under contention
# (10x slower otherwise when other processes are busy) and changes no result the tests check.
torch.set_num_threads(1)

# The test files that take longest (many CLI fits), longest first. README's command runs two workers with
# ``--dist loadfile``, which hands out whole files in collection order: starting these first keeps the long end-to-end
# pipeline test from being the last file to start (it alone takes ~5 minutes on a 2-core CPU).
SLOWEST_FIRST = ("test_pipeline.py", "test_fault_tolerance.py", "test_predict_compare.py", "test_multidevice.py",
                 "test_editing.py", "test_gpu_check.py", "test_block_diffusion.py", "test_chat.py")


def pytest_collection_modifyitems(config, items):
    """Order the files slowest first (a stable sort: tests keep their order within a file, the rest by name)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))


REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DATA = REPO / "data"
SHIPPED_TOKENIZER = REPO / "nanollada" / "assets" / "tokenizer.model"

WORDS = ("the quick brown fox jumps over a lazy dog while models learn tokens from data and every training step "
         "prints its loss value def return class import numpy torch 2024 3.14 hello world").split()


def english_lines(n: int, seed: int = 0, words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def write_jsonl(path: Path, records: list, gz: bool | None = None) -> Path:
    """Write records (dicts, or raw str/bytes lines written verbatim) as JSON Lines; .gz paths are gzipped."""
    path = Path(path)
    data = b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
                     .encode("utf-8")) + b"\n" for r in records)
    if gz if gz is not None else path.name.endswith(".gz"):
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def shipped_tokenizer():
    from nanollada.tokenizer import Tokenizer
    return Tokenizer(SHIPPED_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    """A 400-piece tokenizer trained on generated English (a .jsonl plus a .jsonl.gz file)."""
    from nanollada.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("tiny_tok")
    lines = english_lines(240)
    a = write_jsonl(d / "a.jsonl", [{"text": t} for t in lines[:120]])
    b = write_jsonl(d / "b.jsonl.gz", [{"text": t} for t in lines[120:]])
    return train_tokenizer([str(a), str(b)], d / "out", vocab_size=400)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path):
    from nanollada.tokenizer import Tokenizer
    return Tokenizer(tiny_tokenizer_path)


def fit_config(tmp_dir: Path, name: str = "run", base: str | Path = CONFIGS / "tiny" / "ar_pretrain.yaml",
               ckpt_dir: Path | None = None, train_files: list | None = None, cache_dir: Path | None = None,
               trainer: dict | None = None, model: dict | None = None, data: dict | None = None,
               checkpoint: dict | None = None) -> Path:
    """Load a config, point every output (logs, checkpoints, cache) into tmp_dir, apply overrides, dump it.

    LightningCLI's dotted overrides of a list entry (``--trainer.callbacks.init_args.X``) reach only the last
    callback, so the ModelCheckpoint settings are edited here (``checkpoint``) instead.
    """
    cfg = yaml.safe_load(Path(base).read_text())
    tmp_dir = Path(tmp_dir)
    tr = cfg["trainer"]
    tr["enable_progress_bar"] = False
    tr["logger"]["init_args"]["save_dir"] = str(tmp_dir / "logs")
    tr["logger"]["init_args"]["name"] = name
    tr["logger"]["init_args"]["version"] = 0
    for cb in tr.get("callbacks") or []:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(ckpt_dir or tmp_dir / "checkpoints")
            cb["init_args"].update(checkpoint or {})
    tr.update(trainer or {})
    cfg["model"]["init_args"].update(model or {})
    d = cfg["data"]
    d["train_files"] = [str(f) for f in (train_files or [DATA / "pretrain.jsonl"])]
    d["data_root"] = None
    d["cache_dir"] = str(cache_dir or tmp_dir / "cache")
    d.update(data or {})
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def cli_env(threads: int | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def start_cli(args: list[str], cwd: Path, threads: int | None = 1) -> subprocess.Popen:
    """Start ``python -m nanollada ARGS`` (stdout/stderr captured); pair with ``finish``."""
    return subprocess.Popen([sys.executable, "-m", "nanollada", *map(str, args)], cwd=cwd, env=cli_env(threads),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(args: list[str], cwd: Path, threads: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return finish(start_cli(args, cwd, threads), timeout)


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of a TensorBoard scalar under log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    ea.Reload()
    assert tag in ea.Tags()["scalars"], f"{tag} not logged in {log_dir}: {ea.Tags()['scalars']}"
    return {e.step: e.value for e in ea.Scalars(tag)}


def check_ok(result, what):
    assert result.returncode == 0, f"{what} failed (rc {result.returncode}):\n{result.stderr[-4000:]}"


@pytest.fixture
def cli():
    """The runner: ``cli(args, cwd)`` -> CompletedProcess of ``python -m nanollada ARGS``."""
    return run_cli
