"""Evaluation tasks defined by generic file formats: resolve a task name or file, detect its family, load its items.

Every task is a JSON Lines file (``.jsonl`` or ``.jsonl.gz``, one object per line); its *family* is detected from the
fields of the first record, so any dataset of the same shape works without code:

- ``perplexity``: ``{"text"}``; nats/token and perplexity (AR exact, diffusion an ELBO bound).
- ``minimal_pairs``: ``{"good", "bad"}`` (+ optional ``"phenomenon"``); accuracy of score(good) > score(bad).
- ``multiple_choice``: ``{"query" or "context", "choices", "gold"}`` (+ optional ``"subject"``; a ``context`` may
  hold one ``#idiom#`` blank); accuracy of the most likely choice, raw and per-token length-normalised.
- ``cloze``: ``{"context", "continuation"}``; exact match of the greedy continuation, and its log-likelihood.

Task arguments (``resolve_task``):

- ``blimp``, ``climp``, ``chid``, ``cmmlu`` (any name with a file ``<data_root>/eval/<name>.jsonl.gz``);
- ``ppl-<source>`` (e.g. ``ppl-en-gutenberg``, ``ppl-zh-modern``): the validation records of
  ``<data_root>/pretrain/<source>.jsonl.gz``; ``ppl:<file>``: the validation records of any pretrain file. The split is
  the shared SHA-1 rule (``is_validation(text, SHARED_VAL_FRACTION)``), so every model is scored on the same records;
- anything else is a path to a task file of any family. A ``{"text"}`` file given this way is taken as held out
  already and every record is scored.

``limit`` keeps the first N items, except that items carrying a group field (``phenomenon`` for minimal pairs,
``subject`` for multiple choice) are taken round-robin over the groups in order of first appearance (item 1 of every
group, then item 2, ...), so a capped run still reports every group. Both rules are deterministic.

Malformed files raise ``DataError("path:line: reason")``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nanollada.data.records import SHARED_VAL_FRACTION, DataError, is_validation, iter_records, read_jsonl

FAMILIES = ("perplexity", "minimal_pairs", "multiple_choice", "cloze")
DEFAULT_DATA_ROOT = "../shared/data"
GROUP_FIELD = {"minimal_pairs": "phenomenon", "multiple_choice": "subject"}
# The blank of a ChID-style context: the choice is substituted into it.
BLANK = "#idiom#"


@dataclass
class Task:
    """A loaded task: its name, family, source file and validated items (dicts as in the file)."""

    name: str
    family: str
    path: str
    items: list[dict]
    total: int | None = None  # items available before ``limit`` (None when not counted)
    notes: dict = field(default_factory=dict)

    @property
    def chance(self) -> float | None:
        """Accuracy of random guessing: 1/2 for minimal pairs, mean 1/len(choices) for multiple choice."""
        if self.family == "minimal_pairs":
            return 0.5
        if self.family == "multiple_choice" and self.items:
            return sum(1 / len(it["choices"]) for it in self.items) / len(self.items)
        return None


def data_root(explicit: str | None = None) -> Path:
    """The data directory: ``explicit`` (``--data_root``), else ``$NANOLLADA_DATA``, else ``../shared/data``."""
    return Path(explicit or os.environ.get("NANOLLADA_DATA") or DEFAULT_DATA_ROOT)


def known_tasks(root: Path) -> list[str]:
    """Task names that resolve under ``root``: ``eval/<name>.jsonl.gz`` and ``ppl-<source>`` for pretrain files."""
    names = []
    for sub, prefix in (("eval", ""), ("pretrain", "ppl-")):
        d = root / sub
        if d.is_dir():
            names += sorted(prefix + p.name[: -len(".jsonl.gz")] for p in d.glob("*.jsonl.gz"))
    return names


def detect_family(record) -> str | None:
    """The family a record's fields describe, or None."""
    if not isinstance(record, dict):
        return None
    if "good" in record and "bad" in record:
        return "minimal_pairs"
    if "choices" in record and "gold" in record and ("query" in record or "context" in record):
        return "multiple_choice"
    if "context" in record and "continuation" in record:
        return "cloze"
    if "text" in record:
        return "perplexity"
    return None


def _nonempty_str(record: dict, key: str) -> str:
    v = record.get(key)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f'field "{key}" must be a non-empty string, got {str(v)[:60]!r}')
    return v


def check_item(record: dict, family: str) -> dict:
    """Validate one record of ``family``; raise ValueError with the reason."""
    if family == "perplexity":
        _nonempty_str(record, "text")
    elif family == "minimal_pairs":
        _nonempty_str(record, "good")
        _nonempty_str(record, "bad")
        if "phenomenon" in record and not isinstance(record["phenomenon"], str):
            raise ValueError('field "phenomenon" must be a string')
    elif family == "multiple_choice":
        key = "query" if "query" in record else "context"
        text = record.get(key)
        if not isinstance(text, str):
            raise ValueError(f'field "{key}" must be a string')
        if key == "context" and text.count(BLANK) > 1:
            raise ValueError(f'"context" has {text.count(BLANK)} {BLANK} blanks; at most one is supported')
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError('field "choices" must be a list of at least 2 non-empty strings')
        gold = record.get("gold")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ValueError(f'field "gold" must be an index into the {len(choices)} choices, got {gold!r}')
        if "subject" in record and not isinstance(record["subject"], str):
            raise ValueError('field "subject" must be a string')
    elif family == "cloze":
        if not isinstance(record.get("context"), str):
            raise ValueError('field "context" must be a string')
        _nonempty_str(record, "continuation")
    else:
        raise ValueError(f"unknown task family {family!r}; known: {FAMILIES}")
    return record


def iter_task_file(path: str) -> Iterator[tuple[int, str, dict]]:
    """Yield (line number, family, record) for every non-blank line; the family comes from the first record and
    every later record must match it. Errors name ``path:line``."""
    family = None

    def parse(record: dict) -> dict:
        nonlocal family
        fam = detect_family(record)
        if family is None:
            if fam is None:
                raise ValueError(
                    f"cannot tell the task family from the fields {sorted(record)}: expected "
                    '{"text"} (perplexity), {"good","bad"} (minimal pairs), {"query" or "context","choices",'
                    '"gold"} (multiple choice) or {"context","continuation"} (cloze)')
            family = fam
        elif fam != family:
            raise ValueError(f"record of family {fam} in a {family} file (family set by the first record)")
        return check_item(record, family)

    try:
        for lineno, record in read_jsonl(path, parse):  # errors: DataError("path:line: reason")
            yield lineno, family, record
    except FileNotFoundError:
        raise DataError(f"task file not found: {path}") from None
    if family is None:
        raise DataError(f"{path}: no records (empty task file)")


def _round_robin(items: list[dict], key: str, limit: int) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for it in items:
        groups.setdefault(str(it.get(key, "")), []).append(it)
    out: list[dict] = []
    depth = 0
    while len(out) < limit:
        row = [g[depth] for g in groups.values() if depth < len(g)]
        if not row:
            break
        out += row[: limit - len(out)]
        depth += 1
    return out


def load_task_file(path: str, name: str | None = None, limit: int | None = None) -> Task:
    """Load any task file (family detected from the first record). ``limit``: see the module docstring."""
    items: list[dict] = []
    family, complete = None, True
    for _, family, record in iter_task_file(str(path)):
        items.append(record)
        gkey = GROUP_FIELD.get(family)
        if limit is not None and len(items) >= limit and not (gkey and gkey in items[0]):
            complete = False  # plain first-N: stop reading early
            break
    total = len(items) if complete else None
    gkey = GROUP_FIELD.get(family)
    if limit is not None and len(items) > limit:
        items = _round_robin(items, gkey, limit) if gkey and gkey in items[0] else items[:limit]
    return Task(name or name_from_path(path), family, str(path), items, total)


def name_from_path(path: str | Path) -> str:
    """``dir/my-task.jsonl.gz`` -> ``my-task``."""
    name = Path(path).name
    for ext in (".gz", ".jsonl", ".json"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    return name


def load_perplexity_split(path: str, name: str, limit: int | None = None) -> Task:
    """The validation records (shared SHA-1 rule) of a pretrain file, in file order, at most ``limit``."""
    if not Path(path).is_file():
        raise DataError(f"pretrain file not found: {path}")
    items = []
    for key, record in iter_records(str(path), "pretrain"):
        if not is_validation(key, SHARED_VAL_FRACTION) or not key.strip():
            continue
        items.append({"text": record["text"]})
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise DataError(f"{path}: no validation records (SHA-1 split rule, fraction {SHARED_VAL_FRACTION:.4f})")
    return Task(name, "perplexity", str(path), items, None, {"split": "validation"})


def resolve_task(spec: str, root: str | Path | None = None, limit: int | None = None) -> Task:
    """A task from a command-line argument (a known name, ``ppl-<source>``, ``ppl:<file>`` or a file path)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    root = data_root(str(root) if root else None)
    if spec.startswith("ppl:"):
        path = spec[len("ppl:"):]
        return load_perplexity_split(path, "ppl:" + name_from_path(path), limit)
    if spec.startswith("ppl-"):
        path = root / "pretrain" / f"{spec[len('ppl-'):]}.jsonl.gz"
        if path.is_file():
            return load_perplexity_split(str(path), spec, limit)
    elif "/" not in spec and not spec.endswith((".jsonl", ".gz")):
        path = root / "eval" / f"{spec}.jsonl.gz"
        if path.is_file():
            return load_task_file(str(path), spec, limit)
    if Path(spec).is_file():
        return load_task_file(spec, None, limit)
    if "/" in spec or spec.endswith((".jsonl", ".gz", ".json")):
        raise DataError(f"task file not found: {spec}")
    known = known_tasks(root)
    raise DataError(f"unknown task {spec!r}: not a file and not a task under the data root {root} "
                    f"(--data_root or NANOLLADA_DATA); known tasks: {', '.join(known) or 'none found'}; "
                    "or give ppl:<pretrain file> or a path to a jsonl/jsonl.gz task file")
