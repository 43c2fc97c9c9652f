"""The ``--help`` format of the project's argparse commands (``prepare``, ``tokenizer``, ...)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, ``(default: X)``, or ``(required)`` for a flag without one; a help
    text that already says ``(default ...)`` in words is left as it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return f"{text} (required)".strip()
        if "(default" in text:
            return text
        return super()._get_help_string(action)
