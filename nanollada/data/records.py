"""Reading pretrain/SFT JSON Lines (.jsonl or .jsonl.gz) as a stream, with errors that name file and line.

Pretrain records: ``{"text": str, ...}``. SFT records: ``{"conversations": [{"role", "content"}, ...], ...}``.
Preference records (MiniMind's ``dpo.jsonl``): ``{"chosen": [messages], "rejected": [messages], ...}`` sharing every
message but the last assistant turn (``check_preference``); their split key is the first message's ``content``.
The validation split is a pure function of the record's key text (``text``, or the first message's ``content``):
a record is held out when the SHA-1 of that text, read as a fraction of 2**32 from its first 8 hex digits, is below
``val_fraction``. With ``val_fraction = 2/256`` this is exactly ../shared/data/README.md's rule (digest starts with
``00`` or ``01``), so every model is scored on the same records.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nanollada.errors import UserError
from nanollada.tokenizer import ROLES

SHARED_VAL_FRACTION = 2 / 256
# ../shared/data/README.md's rule for the small preference files: first hex digit of the SHA-1 is 0 or 1 (1/8).
PREFERENCE_VAL_FRACTION = 2 / 16
KINDS = ("pretrain", "sft", "preference")


class DataError(UserError, ValueError):
    """A data file that cannot be used; the message names it (``file:line:`` first for a malformed line)."""


@dataclass
class ReadStats:
    """Counts kept while streaming a file (skipped lines are counted, never silently lost)."""

    records: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def is_validation(key_text: str, val_fraction: float) -> bool:
    digest = hashlib.sha1(key_text.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) < val_fraction * 2**32


def _check_messages(conv, name: str) -> None:
    if not isinstance(conv, list) or not conv:
        raise ValueError(f'missing non-empty list "{name}"')
    for m in conv:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"bad message {str(m)[:80]!r} in {name!r}: need role in {ROLES} and string content")


def check_preference(record: dict) -> tuple[list[dict], dict, dict]:
    """Validate a preference pair and split it: (prompt messages, chosen answer, rejected answer).

    ``chosen`` and ``rejected`` must hold the same messages but the last (the shared prompt, at least one message)
    and each end in an assistant turn (the two answers compared); raise ValueError with the reason."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    _check_messages(chosen, "chosen")
    _check_messages(rejected, "rejected")
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise ValueError(f'"{name}" ends in a {conv[-1]["role"]} turn, not an assistant answer')
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
                  min(len(chosen), len(rejected)) - 1)
        raise ValueError(f'"chosen" ({len(chosen)} messages) and "rejected" ({len(rejected)}) do not share a prompt: '
                         f"every message but the last must be the same (first difference at message {at}; "
                         "at least one prompt message)")
    return chosen[:-1], chosen[-1], rejected[-1]


def _check(record, kind: str) -> str:
    """Validate a record of ``kind`` and return its split key text; raise ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if kind == "preference":
        return check_preference(record)[0][0]["content"]
    if kind == "pretrain":
        if not isinstance(record.get("text"), str):
            raise ValueError('missing string field "text"')
        return record["text"]
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError('missing non-empty list "conversations"')
    for m in conv:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"bad message {str(m)[:80]!r}: need role in {ROLES} and string content")
    if not any(m["role"] == "assistant" for m in conv):
        raise ValueError("conversation has no assistant turn")
    return conv[0]["content"]


def read_jsonl(path: str, parse: Callable[[dict], Any] | None = None, skip_bad_lines: bool = False,
               stats: ReadStats | None = None, hint: str = "") -> Iterator[tuple[int, Any]]:
    """The one JSON Lines reader (data files, evaluation task files, tokenizer training): yield
    ``(line number, value)`` for every non-blank line of a .jsonl or .jsonl.gz file, streamed.

    Each line must be UTF-8 JSON holding an object; ``value`` is that dict, or ``parse(dict)`` when given (a check
    that raises ValueError with the reason). A bad line raises ``DataError("path:line: reason" + hint)``, or with
    ``skip_bad_lines`` is counted in ``stats`` (the first five reasons kept) and skipped. A corrupt or truncated
    gzip stream raises ``DataError("path:line: unreadable (...)")`` naming the line it stopped at (never skipped).
    A missing file raises FileNotFoundError.
    """
    stats = stats if stats is not None else ReadStats()
    # Lines are read as bytes and decoded one by one: a text-mode reader decodes whole chunks ahead, so a bad byte on
    # line 3 would surface while reading line 1 and the error would name the wrong line.
    with open_binary(path) as fh:
        lineno = 0
        while True:
            try:
                raw = fh.readline()
            except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise DataError(f"{path}:{lineno + 1}: unreadable ({type(e).__name__}: {e})") from None
            if not raw:
                return
            lineno += 1
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise ValueError(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                value = parse(record) if parse is not None else record
            except ValueError as e:
                reason = f"{path}:{lineno}: {e}"
                if not skip_bad_lines:
                    raise DataError(reason + hint) from None
                stats.skipped += 1
                if len(stats.skipped_examples) < 5:
                    stats.skipped_examples.append(reason)
                continue
            stats.records += 1
            yield lineno, value


def detect_kind(path: str) -> str:
    """``pretrain`` or ``sft`` from the first non-blank record of a file (``text`` vs ``conversations``)."""
    def kind(record: dict) -> str:
        if "text" in record:
            return "pretrain"
        if "conversations" in record:
            return "sft"
        raise ValueError("neither a pretrain {'text'} nor an SFT {'conversations'} record")

    for _, k in read_jsonl(path, kind):
        return k
    raise DataError(f"{path}: no records")


def iter_records(path: str, kind: str, skip_bad_lines: bool = False,
                 stats: ReadStats | None = None) -> Iterator[tuple[str, dict]]:
    """Yield (split_key_text, record) for every valid line of ``path``.

    A malformed line raises ``DataError("path:line: reason")`` unless ``skip_bad_lines``, in which case it is
    counted in ``stats`` (with the first few reasons kept for the log). Blank lines are ignored.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for _, item in read_jsonl(path, lambda record: (_check(record, kind), record), skip_bad_lines, stats,
                              hint=" (set skip_bad_lines: true to skip and count such lines)"):
        yield item


def open_binary(path: str):
    """Open .jsonl or .jsonl.gz for reading raw bytes (streamed, never read whole)."""
    path = str(path)
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
