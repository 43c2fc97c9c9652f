"""The ``nanollada`` command: LightningCLI's fit/validate/test plus the project's own commands.

    nanollada fit --config configs/tiny/ar_pretrain.yaml       # train (LightningCLI)
    nanollada validate|test --config ... --ckpt_path ...       # score a checkpoint on the validation rows
    nanollada predict --ckpt ... --prompt "..."                # sample from a checkpoint (AR or diffusion)
    nanollada tokenizer train --input a.jsonl --vocab-size 8192 --output dir
"""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from nanollada.data.datamodule import LMDataModule
from nanollada.lm.base import LanguageModel

LIGHTNING_COMMANDS = ("fit", "validate", "test")


class NanoLLaDACLI(LightningCLI):
    """LightningCLI with the tokenizer shared by data and model (one setting: ``data.tokenizer``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer")


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
        ("test", "like validate, logged under test/ (LightningCLI)"))]
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
