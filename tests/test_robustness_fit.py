"""No silent wrong results and no raw tracebacks around `nanollada fit` / `validate` (issue 17).

- a fresh fit never lands on an earlier run's checkpoints (refused, or ``--overwrite_checkpoints``), ``--ckpt_path
  last`` still resumes, and a checkpoint directory that another live fit holds (lock file) is refused;
- SFT data whose answers were all cut by ``seq_len`` is refused, a large cut share is warned about;
- user errors (empty data file, ``seq_len`` above ``max_seq_len``, a missing or foreign ``init_from``, a missing or
  corrupt ``--ckpt_path``, an unwritable or full checkpoint directory) are one line ``nanollada CMD: error: ...``;
- validate/test open no new ``version_N``; every prepare/tokenizer flag has a help text and a default; the README's
  outputs are git-ignored; the training bar counts optimizer steps of ``max_steps``.

Fits run in process (``nanollada.cli.main``) on the tiny preset for 1-2 steps; refusals stop before any training.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import lightning.pytorch  # noqa: F401  imported here, its log handler writes to the real stderr, not one test's capsys
import pytest
import torch
import yaml

from conftest import CONFIGS, DATA, REPO, fit_config, write_jsonl

TRAINER = dict(max_steps=1, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0, log_every_n_steps=1)
DATA_ARGS = dict(seq_len=32, batch_size=2, max_val_rows=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def config(tmp: Path, cache: Path, **kw) -> Path:
    return fit_config(tmp, name="run", trainer={**TRAINER, **kw.pop("trainer", {})},
                      data={**DATA_ARGS, **kw.pop("data", {})}, cache_dir=cache, **kw)


def nanollada(args: list, capsys) -> tuple[int, str]:
    """Run ``nanollada ARGS`` in process: (exit status, stderr)."""
    from nanollada.cli import main
    capsys.readouterr()
    try:
        with mock.patch.object(sys, "argv", ["nanollada"]):
            main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"nanollada {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


# ------------------------------------------------------------------------------------------ 1. runs never mix
def test_fresh_fit_over_old_checkpoints_is_refused_and_resume_still_works(tmp_path, cache, capsys):
    cfg = config(tmp_path, cache)
    ckpts = tmp_path / "checkpoints"
    assert nanollada(["fit", "--config", cfg], capsys)[0] == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]  # the lock file is gone
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["nanollada"]["tokenizer_path"].endswith(
        "tokenizer.model")
    before = (ckpts / "last.ckpt").read_bytes()

    code, err = nanollada(["fit", "--config", cfg], capsys)  # the same config again, no --ckpt_path
    line = one_error_line(err, "fit")
    assert code == 2 and str(ckpts) in line and "1 checkpoint of an earlier run (last.ckpt)" in line
    assert "--ckpt_path last" in line and "--overwrite_checkpoints true" in line
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"] and (ckpts / "last.ckpt").read_bytes() == before

    assert nanollada(["fit", "--config", cfg, "--ckpt_path", "last", "--trainer.max_steps", "2"], capsys)[0] == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"] and step(ckpts / "last.ckpt") == 2

    code, err = nanollada(["fit", "--config", cfg, "--overwrite_checkpoints", "true"], capsys)
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"] and step(ckpts / "last.ckpt") == 1


@pytest.fixture
def sleeper():
    """A live process other than this one (its pid goes into a lock file)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_directory_locked_by_a_live_fit_is_refused(tmp_path, cache, capsys, sleeper):
    cfg = config(tmp_path, cache)
    lock = tmp_path / "checkpoints" / ".nanollada-fit.lock"
    lock.parent.mkdir()
    lock.write_text(f"{sleeper.pid} {socket.gethostname()}\n")
    code, err = nanollada(["fit", "--config", cfg], capsys)
    line = one_error_line(err, "fit")
    assert code == 2 and f"another fit (pid {sleeper.pid} on {socket.gethostname()})" in line and str(lock) in line
    assert lock.read_text() == f"{sleeper.pid} {socket.gethostname()}\n"  # the other fit's lock is left alone
    assert not (tmp_path / "logs").exists()  # refused before anything was written


def fake_trainer(*dirs: Path) -> SimpleNamespace:
    return SimpleNamespace(checkpoint_callbacks=[SimpleNamespace(dirpath=str(d)) for d in dirs], loggers=[],
                           default_root_dir=".")


def test_fit_guard_lock_is_exclusive_takes_over_a_dead_one_and_cleans_up(tmp_path, sleeper):
    from nanollada.callbacks import FitGuard
    from nanollada.errors import ConfigError
    d = tmp_path / "a" / "checkpoints"
    first = FitGuard()
    first.acquire(fake_trainer(d, d))  # one lock per directory, however many callbacks write there
    lock = d / ".nanollada-fit.lock"
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    lock.write_text(f"{sleeper.pid} {socket.gethostname()}\n")  # as if another live process held it
    with pytest.raises(ConfigError, match="another fit"):
        FitGuard().acquire(fake_trainer(d))
    sleeper.kill()
    sleeper.wait()  # now its pid is dead: the lock is stale and is taken over
    second = FitGuard()
    second.acquire(fake_trainer(d))
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    second.release()
    assert not lock.exists() and d.is_dir()
    first.release()
    assert not (tmp_path / "a").exists()  # the directories the first guard created stayed empty: removed again


# ------------------------------------------------------------------------------------------ 2. SFT answers cut away
def sft(prompt_words: int, i: int) -> dict:
    return {"conversations": [{"role": "user", "content": " ".join(["word"] * prompt_words) + f" {i}"},
                              {"role": "assistant", "content": f"answer {i}"}]}


def test_sft_rows_without_answer_tokens_are_refused(tmp_path):
    from nanollada.data.datamodule import LMDataModule
    from nanollada.data.records import DataError
    dm = LMDataModule([str(DATA / "sft.jsonl")], kind="sft", seq_len=8, val_fraction=0.05,
                      cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "\n" not in msg and "no answer tokens in the train rows" in msg and str(DATA / "sft.jsonl") in msg
    assert "data.seq_len=8" in msg and "2,000 of the files' 2,000 conversations were cut" in msg


def test_many_cut_sft_rows_warn_with_count_and_share(tmp_path, capsys):
    from nanollada.data.datamodule import LMDataModule
    rows = [sft(200 if i % 4 == 0 else 2, i) for i in range(80)]  # every 4th prompt is longer than seq_len
    f = write_jsonl(tmp_path / "cut.jsonl", rows)
    dm = LMDataModule([str(f)], kind="sft", seq_len=48, val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")  # some answers are left: not refused
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "20 of 80 train conversations (25%) lost every answer token" in warning[0], warning
    assert str(f) in warning[0] and "data.seq_len=48" in warning[0]


# ------------------------------------------------------------------------------------------ 3. one-line errors
def test_empty_data_file_is_one_line_in_fit_and_prepare(tmp_path, cache, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    code, err = nanollada(["fit", "--config", config(tmp_path, cache, train_files=[empty])], capsys)
    line = one_error_line(err, "fit")
    assert code == 2 and f"{empty}: no records" in line and "empty" in line
    assert not (tmp_path / "checkpoints").exists()  # the guard's directory is removed again
    with pytest.raises(SystemExit, match=f"{re.escape(str(empty))}: no records"):
        from nanollada.prepare import prepare_command
        prepare_command(["--files", str(empty), "--kind", "pretrain", "--cache_dir", str(tmp_path / "c2")])


def test_seq_len_above_max_seq_len_is_refused_before_caching(tmp_path, capsys):
    cfg = config(tmp_path, tmp_path / "fresh_cache", data=dict(seq_len=1024))
    code, err = nanollada(["fit", "--config", cfg], capsys)
    line = one_error_line(err, "fit")
    assert code == 2 and "data.seq_len 1024 is longer than model.max_seq_len 512" in line
    assert not (tmp_path / "fresh_cache").exists()


def test_missing_init_from_and_tokenizer_errors_are_one_line(tmp_path, cache, capsys, monkeypatch):
    cfg = config(tmp_path, cache)
    code, err = nanollada(["fit", "--config", cfg, "--model.init_args.init_from", tmp_path / "gone.ckpt"], capsys)
    assert code == 2 and f"model.init_from {tmp_path / 'gone.ckpt'}: no such checkpoint" in one_error_line(err, "fit")
    code, err = nanollada(["fit", "--config", cfg, "--data.tokenizer", tmp_path / "none.model"], capsys)
    assert code == 2 and "tokenizer model not found" in one_error_line(err, "fit")
    monkeypatch.setenv("NANOLLADA_DEBUG", "1")  # the traceback, for a developer (jsonargparse's, around ours)
    with pytest.raises(ValueError, match="tokenizer model not found"):
        from nanollada.cli import main
        main(["fit", "--config", str(cfg), "--data.tokenizer", str(tmp_path / "none.model")])


def test_init_from_of_another_tokenizer_names_both_tokenizers(tmp_path, cache, capsys, tiny_tokenizer_path):
    from nanollada.lm import ARLM
    from nanollada.tokenizer import Tokenizer
    theirs = ARLM(preset="tiny", max_seq_len=64, tokenizer=str(tiny_tokenizer_path))
    ckpt = tmp_path / "other_tok.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in theirs.model.state_dict().items()},
                "nanollada": {"paradigm": "ar", "tokenizer_fingerprint": theirs.tokenizer.fingerprint(),
                              "tokenizer_path": str(theirs.tokenizer.path)}}, ckpt)
    cfg = config(tmp_path, cache, model=dict(init_from=str(ckpt)))
    code, err = nanollada(["fit", "--config", cfg], capsys)
    line = one_error_line(err, "fit")
    assert code == 2 and f"model.init_from {ckpt} was trained with tokenizer {theirs.tokenizer.path}" in line
    assert f"not with data.tokenizer {Tokenizer().path}" in line


def test_validate_with_missing_or_corrupt_ckpt_path_is_one_line(tmp_path, cache, capsys):
    cfg = config(tmp_path, cache)
    code, err = nanollada(["validate", "--config", cfg, "--ckpt_path", tmp_path / "nope.ckpt"], capsys)
    assert code == 2 and f"--ckpt_path {tmp_path / 'nope.ckpt'}: no such file" in one_error_line(err, "validate")
    for name, content in (("garbage.ckpt", b"not a checkpoint"), ("empty.ckpt", b"")):
        (tmp_path / name).write_bytes(content)
        code, err = nanollada(["validate", "--config", cfg, "--ckpt_path", tmp_path / name], capsys)
        assert code == 2 and "is not a loadable checkpoint" in one_error_line(err, "validate")
    good = tmp_path / "good.ckpt"  # a torch file, but not a checkpoint of this project
    torch.save({"weights": torch.zeros(2)}, good)
    code, err = nanollada(["validate", "--config", cfg, "--ckpt_path", good], capsys)
    assert code == 2 and "is not a nanollada checkpoint" in one_error_line(err, "validate")
    truncated = tmp_path / "truncated.ckpt"
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(64)}, "nanollada": {}}, buf)
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    code, err = nanollada(["validate", "--config", cfg, "--ckpt_path", truncated], capsys)
    assert code == 2 and "is not a loadable checkpoint" in one_error_line(err, "validate")


def test_unwritable_checkpoint_directory_is_refused_at_start(tmp_path, cache, capsys, monkeypatch):
    from nanollada.callbacks import FitGuard
    from nanollada.errors import ConfigError
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    cfg = config(tmp_path, cache, ckpt_dir=blocker / "checkpoints")
    code, err = nanollada(["fit", "--config", cfg], capsys)
    assert code == 2 and f"checkpoint directory {blocker / 'checkpoints'} is not writable" in \
        one_error_line(err, "fit")
    real_open = os.open

    def read_only(path, flags, *args):  # the tests run as root, which chmod cannot stop
        if str(path).endswith(".nanollada-fit.lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ConfigError, match=r"checkpoint directory .* is not writable \(Permission denied\)"):
        FitGuard().acquire(fake_trainer(tmp_path / "ro"))


def test_full_disk_at_checkpoint_save_says_no_space_left(tmp_path, monkeypatch):
    from nanollada.checkpoint import AtomicCheckpointIO
    from nanollada.errors import CheckpointWriteError

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    target = tmp_path / "last.ckpt"
    with pytest.raises(CheckpointWriteError) as e:
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)
    assert isinstance(e.value, OSError) and str(e.value).startswith(f"no space left on device writing checkpoint "
                                                                   f"{target}")
    assert list(tmp_path.iterdir()) == []  # the temporary file was removed


# ------------------------------------------------------------------------------------------ 4. smaller
def test_validate_and_test_open_no_new_version(tmp_path, cache, capsys):
    cfg = config(tmp_path, cache)
    data = yaml.safe_load(cfg.read_text())
    data["trainer"]["logger"]["init_args"]["version"] = None  # as in the shipped configs: a new version per run
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    assert nanollada(["fit", "--config", cfg], capsys)[0] == 0
    runs = tmp_path / "logs" / "run"
    before = sorted(str(p.relative_to(runs)) for p in runs.rglob("*"))
    assert [p.name for p in runs.iterdir()] == ["version_0"]
    for sub in ("validate", "test", "validate"):
        code, err = nanollada([sub, "--config", cfg, "--ckpt_path", tmp_path / "checkpoints" / "last.ckpt"], capsys)
        assert code == 0, err[-3000:]
    assert sorted(str(p.relative_to(runs)) for p in runs.rglob("*")) == before


def help_entries(text: str) -> list[tuple[str, str]]:
    """(flags, help text) of every option of an argparse --help text: an option's line starts with "  -", its help
    follows after two spaces or on the more indented lines below it."""
    entries, inside = [], False
    for line in text.splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
            inside = True
        elif inside and line.startswith("    "):
            entries[-1] += "  " + line.strip()
        else:
            inside = False
    return [tuple((e.split("  ", 1) + [""])[:2]) for e in entries]


@pytest.mark.parametrize("argv", [["prepare"], ["tokenizer", "train"], ["tokenizer", "stats"]], ids=" ".join)
def test_every_prepare_and_tokenizer_flag_has_help_and_default(argv, capsys):
    from nanollada.commands import COMMANDS
    with pytest.raises(SystemExit) as e:
        COMMANDS[argv[0]](argv[1:] + ["--help"])
    assert e.value.code == 0
    entries = [(flag, text) for flag, text in help_entries(capsys.readouterr().out) if flag != "-h, --help"]
    assert len(entries) >= 3
    for flag, text in entries:
        assert text.strip(), f"{argv}: {flag} has no help text"
        assert "(default" in text or "(required)" in text, f"{argv}: {flag} shows no default: {text}"


def test_readme_outputs_are_git_ignored():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    names = ["out.jsonl", "trace.html", "demo.trace.html", "exported/tiny_ar/model.safetensors", "merged.ckpt",
             "predictions.jsonl", "eval.json", "gen.png"]
    r = subprocess.run(["git", "check-ignore", *names], cwd=REPO, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(names), r.stdout + r.stderr


def test_progress_bar_counts_optimizer_steps_of_max_steps(tmp_path):
    import lightning as L

    from nanollada.callbacks import StepProgressBar
    from nanollada.data.datamodule import LMDataModule
    from nanollada.lm import ARLM

    def fit(max_steps: int, ckpt_path=None) -> StepProgressBar:
        bar = StepProgressBar()
        trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=2, callbacks=[bar], logger=False,
                            default_root_dir=tmp_path, limit_val_batches=0, num_sanity_val_steps=0,
                            use_distributed_sampler=False, enable_model_summary=False, accelerator="cpu")
        torch.manual_seed(0)
        trainer.fit(ARLM(preset="tiny", max_seq_len=64, warmup_steps=0),
                    LMDataModule([str(DATA / "pretrain.jsonl")], seq_len=16, batch_size=2, val_fraction=0.05,
                                 cache_dir=str(tmp_path / "cache")), ckpt_path=ckpt_path)
        trainer.save_checkpoint(tmp_path / "at.ckpt")
        return bar

    bar = fit(2).train_progress_bar  # 4 micro-batches, 2 optimizer steps
    assert (bar.n, bar.total, bar.initial) == (2, 2, 0)
    bar = fit(3, tmp_path / "at.ckpt").train_progress_bar  # resumed at step 2: 2/3, then 3/3 (not "1/?")
    assert (bar.n, bar.total, bar.initial) == (3, 3, 2)


def test_cli_uses_the_step_progress_bar(monkeypatch):
    from nanollada.callbacks import StepProgressBar
    from nanollada.cli import NanoLLaDACLI
    from nanollada.data.datamodule import LMDataModule
    from nanollada.lm.base import LanguageModel
    monkeypatch.chdir(REPO)
    cli = NanoLLaDACLI(LanguageModel, LMDataModule, subclass_mode_model=True, run=False, save_config_callback=None,
                       args=["--config", str(CONFIGS / "tiny" / "ar_pretrain.yaml")],
                       trainer_defaults={"use_distributed_sampler": False})
    assert type(cli.trainer.progress_bar_callback) is StepProgressBar
