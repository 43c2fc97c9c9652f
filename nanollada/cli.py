"""The ``nanollada`` command: LightningCLI's fit/validate/test/predict plus the project's own commands.

    nanollada fit --config configs/tiny/ar_pretrain.yaml       # train (LightningCLI)
    nanollada validate|test --config ... --ckpt_path ...       # score a checkpoint on the validation rows
    nanollada predict --config ... --ckpt_path C --data.predict_file prompts.txt --output out.jsonl   # LightningCLI
    nanollada predict --ckpt C --prompt "..."                  # the quick form: no config, same code underneath
    nanollada tokenizer train --input a.jsonl --vocab-size 8192 --output dir
"""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from nanollada.data.datamodule import LMDataModule
from nanollada.lm.base import LanguageModel

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class NanoLLaDACLI(LightningCLI):
    """LightningCLI with the tokenizer shared by data and model (one setting: ``data.tokenizer``).

    ``predict`` also takes every ``GenerationSettings`` field as ``--generation.*`` and ``--output FILE``: the model's
    ``predict_step`` samples with those settings and a ``JSONLPredictionWriter`` writes one line per prompt."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            from nanollada.generate import GenerationSettings
            parser.add_class_arguments(GenerationSettings, "generation", instantiate=False)
            parser.add_argument("--output", type=str, default="predictions.jsonl",
                                help="JSONL file for the answers, one line per prompt in input order")
        if subcommand in ("validate", "test"):
            parser.add_argument("--results_json", type=str | None, default=None,
                                help="also write the logged val/* (test/*) metrics and the checkpoint path to this "
                                     "JSON file (what scripts/pipeline.py reads)")
        return parser

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
