"""The ``nanollada`` command: LightningCLI's fit/validate/test/predict plus the project's own commands.

    nanollada fit --config configs/tiny/ar_pretrain.yaml       # train (LightningCLI)
    nanollada validate|test --config ... --ckpt_path ...       # score a checkpoint on the validation rows
    nanollada predict --config ... --ckpt_path C --data.predict_file prompts.txt --output out.jsonl   # LightningCLI
    nanollada predict --ckpt C --prompt "..."                  # the quick form: no config, same code underneath
    nanollada tokenizer train --input a.jsonl --vocab-size 8192 --output dir

Errors in the user's files, settings or environment (``nanollada.errors.UserError``, e.g. a malformed data line, a
``data.seq_len`` above ``model.max_seq_len``, a missing ``--ckpt_path``) are printed as one line,
``nanollada <command>: error: ...``, with exit status 2; ``NANOLLADA_DEBUG=1`` shows the traceback instead.

``fit`` never mixes runs (``nanollada.callbacks.FitGuard``): a fresh fit into a checkpoint directory that already
holds checkpoints is refused (resume with ``--ckpt_path last``, choose another directory, or pass
``--overwrite_checkpoints true``), and so is a second fit into a directory another live fit is writing.
``validate`` and ``test`` never open a new ``version_N`` directory: with a logger whose version is not fixed (the
shipped configs) they log nothing, they print their metrics and write ``--results_json``; a logger with a fixed
``version``, or any ``--trainer.logger...`` flag on their command line, is kept. The training progress bar counts
optimizer steps of ``max_steps`` (``nanollada.callbacks.StepProgressBar``).
"""

from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from nanollada.callbacks import FitGuard, StepProgressBar
from nanollada.data.datamodule import LMDataModule
from nanollada.errors import ConfigError, UserError
from nanollada.lm.base import LanguageModel

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")  # resolved by Lightning, not files


class NanoLLaDACLI(LightningCLI):
    """LightningCLI with the tokenizer shared by data and model (one setting: ``data.tokenizer``).

    ``predict`` also takes every ``GenerationSettings`` field as ``--generation.*`` and ``--output FILE``: the model's
    ``predict_step`` samples with those settings and a ``JSONLPredictionWriter`` writes one line per prompt."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer")

    def parse_arguments(self, parser, args) -> None:
        """Parse, then check ``--ckpt_path`` before LightningCLI reads it (a missing or corrupt file is one line)."""
        raw = sys.argv[1:] if args is None else args
        self.logger_named = isinstance(raw, list) and any(str(a).startswith("--trainer.logger") for a in raw)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_ckpt_path(self.config[subcommand].get("ckpt_path"))

    def before_instantiate_classes(self) -> None:
        if self.subcommand in ("validate", "test") and not self.logger_named:
            trainer = self.config[self.subcommand]["trainer"]
            if not fixed_version(trainer.get("logger")):
                trainer["logger"] = False  # a logger without a fixed version would open a new version_N each run

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        callbacks = self.trainer.callbacks
        for i, cb in enumerate(callbacks):  # Lightning's default bar (or a configured plain one): count steps
            if type(cb) is TQDMProgressBar:
                callbacks[i] = StepProgressBar(refresh_rate=cb.refresh_rate, process_position=cb.process_position)

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            from nanollada.generate import GenerationSettings
            parser.add_class_arguments(GenerationSettings, "generation", instantiate=False)
            parser.add_argument("--output", type=str, default="predictions.jsonl",
                                help="JSONL file for the answers, one line per prompt in input order")
        if subcommand == "fit":
            parser.add_argument("--overwrite_checkpoints", type=bool, default=False,
                                help="delete the *.ckpt files an earlier run left in the checkpoint directory and "
                                     "start over there (without it, a fit without --ckpt_path refuses such a "
                                     "directory)")
        if subcommand in ("validate", "test"):
            parser.add_argument("--results_json", type=str | None, default=None,
                                help="also write the logged val/* (test/*) metrics and the checkpoint path to this "
                                     "JSON file (what scripts/pipeline.py reads)")
        return parser

    def before_fit(self) -> None:
        """Refuse at once what would fail or mix runs later: a missing ``init_from`` (fresh fits), an unwritable,
        locked or already used checkpoint directory (``FitGuard``, on rank 0, whose lock the fit's end removes)."""
        cfg = self.config["fit"]
        resume = cfg.get("ckpt_path") is not None
        init_from = self.model.hparams.get("init_from")
        if init_from and not resume and not os.path.isfile(init_from):
            raise ConfigError(f"model.init_from {init_from}: no such checkpoint (resolved to "
                              f"{os.path.abspath(init_from)}); train that stage first or fix the path")
        if rank_zero_only.rank == 0:  # other ranks (DDP subprocesses, torchrun) run under rank 0's lock
            guard = FitGuard(resume=resume, overwrite=bool(cfg.get("overwrite_checkpoints")))
            guard.acquire(self.trainer)
            self.trainer.callbacks.append(guard)

    def after_validate(self) -> None:
        write_results_json(self.trainer, "validate", self.config["validate"].get("results_json"))

    def after_test(self) -> None:
        write_results_json(self.trainer, "test", self.config["test"].get("results_json"))

    def before_predict(self) -> None:
        from nanollada.generate import GenerationSettings
        from nanollada.prediction import JSONLPredictionWriter
        cfg = self.config["predict"]
        try:
            self.model.generation = GenerationSettings(**cfg["generation"].as_dict())
        except ValueError as e:
            raise SystemExit(f"nanollada predict: {e}".replace("--", "--generation.", 1))
        self.trainer.callbacks.append(JSONLPredictionWriter(cfg["output"]))


def write_results_json(trainer, subcommand: str, path: str | None) -> None:
    """``{"subcommand", "ckpt_path", "metrics": {"val/nll": ..., ...}}`` from the trainer's logged metrics (already
    summed over ranks), written atomically by rank 0."""
    if not path or not trainer.is_global_zero:
        return
    import json
    import os
    prefix = "val/" if subcommand == "validate" else "test/"
    metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(prefix)}
    ckpt = trainer.ckpt_path
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"subcommand": subcommand, "ckpt_path": str(ckpt) if ckpt else None, "metrics": metrics}, fh,
                  indent=1)
    os.replace(tmp, path)


def fixed_version(logger) -> bool:
    """Whether a ``trainer.logger`` setting (bool, one ``class_path``/``init_args`` or a list) writes to a fixed
    version directory, i.e. never opens a new ``version_N``."""
    if isinstance(logger, (list, tuple)):
        return bool(logger) and all(fixed_version(one) for one in logger)
    init_args = getattr(logger, "init_args", None)
    return init_args is not None and getattr(init_args, "version", None) is not None


def check_ckpt_path(path) -> None:
    """A ``--ckpt_path`` file must exist and hold a nanollada checkpoint (read memory-mapped: no weights are copied);
    raise ``ConfigError`` otherwise. Lightning's special values (``last``, ``best``, ...) are left to Lightning."""
    if path is None or str(path) in SPECIAL_CKPT_PATHS or str(path).startswith("registry") or "://" in str(path):
        return
    if not os.path.isfile(path):
        raise ConfigError(f"--ckpt_path {path}: no such file (resolved to {os.path.abspath(path)}); give a .ckpt "
                          "file, or --ckpt_path last for the newest checkpoint of the config's checkpoint directory")
    import zipfile

    import torch
    if not zipfile.is_zipfile(path):  # torch.save's format; a truncated file loses the zip directory at its end
        raise ConfigError(f"--ckpt_path {path} is not a loadable checkpoint (not a torch zip archive: truncated, "
                          "corrupt or another kind of file)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # unpickling and zip errors have many types
        reason = " ".join(str(e).split())[:160]
        raise ConfigError(f"--ckpt_path {path} is not a loadable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "nanollada" not in payload:
        raise ConfigError(f"--ckpt_path {path} is not a nanollada checkpoint (no 'nanollada' entry)")


def lightning_main(command: str, args: list[str] | None) -> None:
    """Run LightningCLI; only ``fit`` saves its resolved config (beside its logs), validate/test write nothing."""
    NanoLLaDACLI(
        LanguageModel, LMDataModule, subclass_mode_model=True, args=args,
        save_config_callback=SaveConfigCallback if command == "fit" else None,
        trainer_defaults={"use_distributed_sampler": False},
        save_config_kwargs={"overwrite": True},
    )


def extra_commands() -> dict:
    from nanollada.commands import COMMANDS
    return COMMANDS


def usage() -> str:
    lines = ["usage: nanollada <command> [options]   (nanollada <command> --help for details)", "", "commands:"]
    lines += [f"  {c:<10} {d}" for c, d in (
        ("fit", "train a model from a YAML config (LightningCLI)"),
        ("validate", "score a checkpoint on the validation rows (LightningCLI)"),
        ("test", "like validate, logged under test/ (LightningCLI)"),
        ("predict", "sample answers: --config C --ckpt_path K --data.predict_file F (LightningCLI), or --ckpt K "
                    "--prompt P"))]
    lines += [f"  {c:<10} {fn.__doc__.strip().splitlines()[0]}" for c, fn in extra_commands().items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    try:
        run_command(command, rest, from_shell)
    except Exception as e:
        user = user_error(e)
        if user is None or os.environ.get("NANOLLADA_DEBUG", "") not in ("", "0"):
            raise
        print(f"nanollada {command}: error: {user}", file=sys.stderr)
        raise SystemExit(2) from None


def user_error(e: BaseException | None) -> UserError | None:
    """The ``UserError`` behind ``e``: itself, or the cause jsonargparse wrapped when a class's ``__init__`` raised it
    ("Does not validate against any of the Union subtypes")."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def run_command(command: str, rest: list[str], from_shell: bool = False) -> None:
    """Dispatch ``nanollada COMMAND REST...`` (``from_shell``: LightningCLI reads ``sys.argv`` itself)."""
    if command == "predict" and not any(a == "--config" or a.startswith(("--config=", "--ckpt_path")) for a in rest):
        from nanollada.commands import predict_command  # the quick form: --ckpt C --prompt P
        predict_command(rest)
        return
    if command in LIGHTNING_COMMANDS:
        lightning_main(command, None if from_shell else [command] + rest)
        return
    commands = extra_commands()
    if command not in commands:
        print(f"nanollada: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    commands[command](rest)


if __name__ == "__main__":
    main()
