"""Errors that describe the user's input, settings or environment, not a bug: the commands print them as one line.

``nanollada.cli.main`` catches every ``UserError`` and prints ``nanollada <command>: error: <message>`` to stderr and
exits with status 2, without a traceback (set ``NANOLLADA_DEBUG=1`` to get the traceback). A message names the file
or setting, the value found and what is allowed, on one line.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a file, a setting, the disk); its message is the whole report."""


class ConfigError(UserError, ValueError):
    """Settings that cannot work (alone or together), or a file named by a setting that cannot be used."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, read-only directory); the previous checkpoint is intact."""
