"""Lightning callbacks the configs name by class path.

``TokenThroughputMonitor`` is Lightning's ``ThroughputMonitor`` counting the rows and tokens of nanollada batches
(``input_ids`` (B, T) from ``ARCollate`` / ``DiffusionCollate``; padding included). It logs, every
``log_every_n_steps`` batches (rank 0; the rates are rolling averages over ``window_size`` batches):

- ``train/device/items_per_sec``: tokens per second per device (``train/items_per_sec``: all devices, when several);
- ``train/device/samples_per_sec``, ``train/device/batches_per_sec``: rows and batches per second;
- ``train/lengths``, ``train/samples``, ``train/batches``, ``train/time``: running totals;
- ``train/device/flops_per_sec`` and ``train/device/mfu`` where the module sets ``flops_per_batch`` (it does, from
  ``Transformer.flops_per_token``) and, for MFU, Lightning knows the device's peak (CUDA GPUs);
- the same under ``validate/`` during fit; validation time is excluded from the training rates.

On a CUDA device it calls ``torch.cuda.synchronize()`` after every batch on rank 0, so the clock measures finished
work. The configs' progress bar already reads the step loss with ``.item()`` every batch, so with the bar on this
adds no new wait; drop the callback from a YAML to remove it (training is unaffected).

``FitGuard`` keeps runs apart: ``nanollada fit`` refuses to start a fresh run over an earlier run's checkpoints and
refuses a second fit into a checkpoint directory another live fit is writing (a lock file). ``StepProgressBar`` is
the CLI's training progress bar: optimizer steps out of ``max_steps``, from the restored step after a resume.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ThroughputMonitor, TQDMProgressBar

from nanollada.errors import ConfigError

LOCK_NAME = ".nanollada-fit.lock"


def batch_rows(batch: dict) -> int:
    """Rows of a collated batch."""
    return int(batch["input_ids"].shape[0])


def batch_tokens(batch: dict) -> int:
    """Tokens of a collated batch (rows x length, padding included)."""
    return int(batch["input_ids"].numel())


class TokenThroughputMonitor(ThroughputMonitor):
    """``ThroughputMonitor`` over nanollada batches: rows are samples, tokens are items.

    Args:
        window_size: Batches in the rolling average of the rates (>= 2); None: ``trainer.log_every_n_steps``
            (at least 2), so each logged rate covers the batches since roughly the previous log.
    """

    def __init__(self, window_size: int | None = None):
        super().__init__(batch_size_fn=batch_rows, length_fn=batch_tokens)
        if window_size is not None and window_size < 2:
            raise ValueError(f"window_size must be >= 2, got {window_size}")
        self.window_size = window_size

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.kwargs["window_size"] = self.window_size or max(2, trainer.log_every_n_steps)
        super().setup(trainer, pl_module, stage)

    # Prediction batches hold prompts, not token tensors; ``predict`` reports tokens/s with every answer.
    def on_predict_start(self, *args, **kwargs) -> None:
        pass

    def on_predict_batch_end(self, *args, **kwargs) -> None:
        pass

    # predict batches are prompts, not token rows: generation reports its own tokens/s per answer
    def on_predict_start(self, trainer, pl_module) -> None:
        pass

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        pass


def checkpoint_dirs(trainer) -> list[Path]:
    """The local directories the trainer's ModelCheckpoint callbacks write to, each once. An unset ``dirpath`` is
    Lightning's default: ``<logger save_dir>/<name>/<version>/checkpoints`` (``<default_root_dir>/checkpoints``
    without a logger)."""
    dirs: list[Path] = []
    for cb in trainer.checkpoint_callbacks:
        d = getattr(cb, "dirpath", None)
        if d is None and trainer.loggers:
            logger = trainer.loggers[0]
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            d = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version, "checkpoints")
        elif d is None:
            d = os.path.join(trainer.default_root_dir, "checkpoints")
        if "://" in str(d):  # remote storage: no local lock or listing
            continue
        d = Path(d).resolve()
        if d not in dirs:
            dirs.append(d)
    return dirs


def _lock_owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file, or None when it cannot be read as such."""
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int, host: str) -> bool:
    """Whether the fit that wrote a lock may still run (a process on another host is assumed to)."""
    if host != socket.gethostname():
        return True
    if pid == os.getpid():  # an earlier fit of this very process that did not end cleanly
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class FitGuard(Callback):
    """One fit per checkpoint directory, and never a fresh fit over an earlier run's checkpoints.

    ``acquire(trainer)``, called by the CLI before the fit starts (on rank 0 only), goes through every directory of
    ``checkpoint_dirs`` and raises a one-line ``ConfigError`` when it

    - cannot be created or written (checked at once, not at the first save);
    - is locked by another live fit: the lock file ``.nanollada-fit.lock`` is created with ``O_EXCL`` and holds
      ``"<pid> <host>"``; a lock whose process is gone (killed) is taken over;
    - already holds ``*.ckpt`` files while ``resume`` is False (no ``--ckpt_path``): a second fresh run would write
      ``last-v1.ckpt`` beside the old ``last.ckpt`` and mix the two runs. With ``overwrite`` those files are deleted
      instead, and the run starts over in that directory.

    As a callback it removes its locks when the fit ends, however it ends (``teardown``, ``on_exception``), and the
    directories it created if they are still empty.
    """

    def __init__(self, resume: bool = False, overwrite: bool = False):
        self.resume, self.overwrite = resume, overwrite
        self.held: list[Path] = []  # lock files this process wrote
        self.created: list[Path] = []  # directories it created, deepest first

    def acquire(self, trainer) -> None:
        try:
            for d in checkpoint_dirs(trainer):
                self._make_dir(d)
                self._lock(d)
                self._check_no_checkpoints(d)
        except BaseException:
            self.release()
            raise

    def _make_dir(self, d: Path) -> None:
        missing = [p for p in (d, *d.parents) if not p.exists()]
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(self._not_writable(d, e)) from None
        self.created = missing + self.created

    @staticmethod
    def _not_writable(d: Path, e: OSError) -> str:
        return (f"checkpoint directory {d} is not writable ({e.strerror or e}): set the ModelCheckpoint dirpath "
                "(trainer.callbacks) to a writable directory, or fix its permissions")

    def _lock(self, d: Path) -> None:
        path = d / LOCK_NAME
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _lock_owner(path)
                if owner is None or _alive(*owner):
                    who = f"pid {owner[0]} on {owner[1]}" if owner else "an unknown process"
                    raise ConfigError(f"another fit ({who}) is writing checkpoints to {d} (lock file {path}): wait for "
                                      "it to end or give this run another ModelCheckpoint dirpath; delete the lock "
                                      "file if that fit is gone") from None
                path.unlink(missing_ok=True)  # its process is gone (killed): take the lock over
                continue
            except OSError as e:
                raise ConfigError(self._not_writable(d, e)) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held.append(path)
            return
        raise ConfigError(f"could not take over the lock file {path} (other fits keep replacing it)")

    def _check_no_checkpoints(self, d: Path) -> None:
        found = sorted(p for p in d.glob("*.ckpt") if p.is_file() and not p.name.startswith("."))
        if not found or self.resume:
            return
        if self.overwrite:
            for p in found:
                p.unlink()
            print(f"[nanollada] --overwrite_checkpoints: deleted {len(found)} checkpoints of an earlier run in {d}")
            return
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ConfigError(f"checkpoint directory {d} already holds {len(found)} checkpoint{'s' * (len(found) > 1)} of an "
                          f"earlier run "
                          f"({names}): resume it with --ckpt_path last (or --ckpt_path <file>), start a new run in "
                          "another directory (the ModelCheckpoint dirpath), or pass --overwrite_checkpoints true to "
                          "delete them and start over")

    def release(self) -> None:
        """Remove this process's locks, then the directories it created if they stayed empty."""
        me = (os.getpid(), socket.gethostname())
        for path in self.held:
            if _lock_owner(path) == me:
                path.unlink(missing_ok=True)
        self.held = []
        for d in self.created:
            try:
                d.rmdir()
            except OSError:  # not empty (checkpoints were written): keep it and its parents
                break
        self.created = []

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.release()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.release()


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, the training bar counting optimizer steps: ``step/max_steps`` with an ETA.

    Lightning's bar counts the epoch's batches: micro-batches under gradient accumulation, and ``40/?`` after a
    resume on an endless stream. This one starts at the restored step (the ETA's rate counts this run's steps only).
    Without ``max_steps`` it is Lightning's bar.
    """

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_steps > 0:
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step
            bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or step == bar.n:  # mid-accumulation: the step has not advanced
            return
        if step % self.refresh_rate == 0 or step == trainer.max_steps:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
