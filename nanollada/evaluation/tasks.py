"""Evaluation tasks defined by generic file formats: resolve a task name or file, detect its family, load its items.

Every task is a JSON Lines file (``.jsonl`` or ``.jsonl.gz``, one object per line) or a raw ``.txt`` file; the
*family* of a JSON Lines file is detected from the fields of the first record, so any dataset of the same shape works
without code:

- ``perplexity``: ``{"text"}``; nats/token and perplexity (AR exact, diffusion an ELBO bound); records longer than
  ``max_seq_len`` are scored in windows.
- ``minimal_pairs``: ``{"good", "bad"}`` (+ optional ``"phenomenon"``); accuracy of score(good) > score(bad).
- ``multiple_choice``: ``{"query" or "context", "choices", "gold"}`` (+ optional ``"subject"``; a ``context`` may
  hold one ``#idiom#`` blank); accuracy of the most likely choice, raw and per-token length-normalised. A ``query``
  is put into the prompt template of its language (:func:`query_language`; an item may force it with
  ``"language": "en"`` or ``"zh"``).
- ``context_choice``: ``{"context_options", "continuation", "gold"}`` (Winogrande-style partial scoring: each option
  is a different context, the continuation is shared); accuracy of the option under which the continuation is most
  likely.
- ``cloze``: ``{"context", "continuation"}`` (e.g. LAMBADA's last word); exact match of the greedy continuation for
  every decoder, and its log-likelihood.
- ``rolling_perplexity``: a ``.txt`` file (WikiText-style raw text), split into documents (:func:`split_documents`);
  token-, word- and byte-level perplexity, long documents scored in windows.
- ``preference``: ``{"chosen", "rejected"}`` conversations sharing a prompt (MiniMind's ``dpo.jsonl``,
  ``records.check_preference``); accuracy of the chosen response being the more likely one, length-normalised.

Task arguments (``resolve_task``):

- ``blimp``, ``climp``, ``chid``, ``cmmlu`` (any name with a file ``<data_root>/eval/<name>.jsonl.gz``);
- ``ppl-<source>`` (e.g. ``ppl-en-gutenberg``, ``ppl-zh-modern``): the validation records of
  ``<data_root>/pretrain/<source>.jsonl.gz``; ``ppl:<file>``: the validation records of any pretrain file. The split is
  the shared SHA-1 rule (``is_validation(text, SHARED_VAL_FRACTION)``), so every model is scored on the same records;
- ``pref-<source>`` (e.g. ``pref-dpo-en``): the held-out pairs of ``<data_root>/pref/<source>.jsonl.gz`` (the
  preference files' rule, ``PREFERENCE_VAL_FRACTION`` = 1/8 -- the pairs DPO training never sees); ``pref:<file>``:
  the held-out pairs of any preference file;
- anything else is a path to a task file of any family. A ``{"text"}`` file given this way is taken as held out
  already and every record is scored.

``limit`` keeps N items spread evenly over the file (items ``floor(i * total / N)``, i = 0..N-1, in file order).
When the items carry a group field (``phenomenon`` for minimal pairs, ``subject`` for multiple choice) the N are
first shared out round-robin over the groups in order of first appearance (one per group, then a second per group,
...), so a capped run still reports every group, and each group's share is spread evenly over that group. Both rules
are deterministic and read the whole file.

Malformed files raise ``DataError("path:line: reason")``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nanollada.data.records import (PREFERENCE_VAL_FRACTION, SHARED_VAL_FRACTION, DataError, check_preference,
                                    is_validation, iter_records, read_jsonl)

FAMILIES = ("perplexity", "minimal_pairs", "multiple_choice", "context_choice", "cloze", "rolling_perplexity",
            "preference")
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
        if self.family in ("minimal_pairs", "preference"):
            return 0.5
        if self.family == "multiple_choice" and self.items:
            return sum(1 / len(it["choices"]) for it in self.items) / len(self.items)
        if self.family == "context_choice" and self.items:
            return sum(1 / len(it["context_options"]) for it in self.items) / len(self.items)
        return None


def data_root(explicit: str | None = None) -> Path:
    """The data directory: ``explicit`` (``--data_root``), else ``$NANOLLADA_DATA``, else ``../shared/data``."""
    return Path(explicit or os.environ.get("NANOLLADA_DATA") or DEFAULT_DATA_ROOT)


def known_tasks(root: Path) -> list[str]:
    """Task names that resolve under ``root``: ``eval/<name>.jsonl.gz``, ``ppl-<source>`` for pretrain files and
    ``pref-<source>`` for preference files."""
    names = []
    for sub, prefix in (("eval", ""), ("pretrain", "ppl-"), ("pref", "pref-")):
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
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "choices" in record and "gold" in record and ("query" in record or "context" in record):
        return "multiple_choice"
    if "context_options" in record and "continuation" in record and "gold" in record:
        return "context_choice"
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
        if key == "query" and record.get("language", "auto") not in (*QUERY_TEMPLATES, "auto"):
            raise ValueError(f'field "language" must be one of {sorted(QUERY_TEMPLATES)} or "auto", '
                             f'got {record.get("language")!r}')
    elif family == "context_choice":
        options = record.get("context_options")
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(c, str) and c for c in options):
            raise ValueError('field "context_options" must be a list of at least 2 non-empty strings')
        _nonempty_str(record, "continuation")
        gold = record.get("gold")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
            raise ValueError(f'field "gold" must be an index into the {len(options)} context_options, got {gold!r}')
    elif family == "cloze":
        if not isinstance(record.get("context"), str):
            raise ValueError('field "context" must be a string')
        _nonempty_str(record, "continuation")
    elif family == "preference":
        check_preference(record)
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
                    '"gold"} (multiple choice), {"context_options","continuation","gold"} (context choice), '
                    '{"context","continuation"} (cloze) or {"chosen","rejected"} (preference)')
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


def evenly_spaced(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n): floor(i * n / k) for i = 0..k-1 (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


def select_items(items: list[dict], limit: int | None, key: str | None = None) -> list[dict]:
    """``limit`` items spread evenly over ``items`` (file order kept); with a group ``key`` present in the first
    item, the limit is shared out round-robin over the groups first (see the module docstring)."""
    if limit is None or len(items) <= limit:
        return items
    if not key or key not in items[0]:
        return [items[i] for i in evenly_spaced(len(items), limit)]
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(str(it.get(key, "")), []).append(i)
    quota = dict.fromkeys(groups, 0)
    left = limit
    while left:
        for g, members in groups.items():
            if left and quota[g] < len(members):
                quota[g] += 1
                left -= 1
    chosen = sorted(members[j] for g, members in groups.items() for j in evenly_spaced(len(members), quota[g]))
    return [items[i] for i in chosen]


def load_task_file(path: str, name: str | None = None, limit: int | None = None) -> Task:
    """Load any task file (family detected from the first record). ``limit``: see the module docstring."""
    items: list[dict] = []
    family = None
    for _, family, record in iter_task_file(str(path)):
        items.append(record)
    total = len(items)
    items = select_items(items, limit, GROUP_FIELD.get(family))
    notes = query_template_notes(items) if family == "multiple_choice" else {}
    return Task(name or name_from_path(path), family, str(path), items, total, notes)


# ------------------------------------------------------------------------------------------------ query templates
# The prompt of a multiple-choice ``query`` (CMMLU-style), by the query's language: (prompt template, delimiter put
# before the choice). The English one is lm-evaluation-harness's "Question: ...\nAnswer:" with a space before the
# choice; the Chinese one has no space (Chinese text has none between words).
QUERY_TEMPLATES = {"zh": ("问题：{query}\n答案：", ""), "en": ("Question: {query}\nAnswer:", " ")}
# Han characters, CJK radicals and CJK / full-width punctuation (evidence of Chinese text)
_HAN = re.compile(r"[\u2e80-\u2fdf\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")


_MATH = re.compile(r"\$\$.*?\$\$|\$.*?\$|\\[A-Za-z]+", re.S)  # LaTeX: $...$, $$...$$, \commands


def query_language(item: dict) -> str:
    """``zh`` or ``en`` for a ``query`` item: its ``"language"`` field when given, else ``zh`` when the query and
    choices, LaTeX math removed, hold at least one Han character (or CJK punctuation) and at least half as many of
    them as Latin words, else ``en`` (on CMMLU: 11,575 zh, 7 language-neutral formulas en)."""
    lang = item.get("language", "auto")
    if lang != "auto":
        return lang
    text = _MATH.sub(" ", item["query"] + " " + " ".join(item.get("choices", [])))
    han = len(_HAN.findall(text))
    return "zh" if han and 2 * han >= len(_LATIN_WORD.findall(text)) else "en"


def query_template_notes(items: list[dict]) -> dict:
    """``{"query_templates": {language: {"template", "items"}}}`` for the query items of a task (empty if none)."""
    used: dict[str, int] = {}
    for it in items:
        if "query" in it:
            lang = query_language(it)
            used[lang] = used.get(lang, 0) + 1
    if not used:
        return {}
    return {"query_templates": {lang: {"template": QUERY_TEMPLATES[lang][0], "delimiter": QUERY_TEMPLATES[lang][1],
                                       "items": n} for lang, n in sorted(used.items())}}


# ------------------------------------------------------------------------------------------------ raw text files
TEXT_SPLITS = ("auto", "blank", "heading", "file")
# A document heading: markdown "# Title" or a WikiText top-level " = Title = " (one "=" each side).
_HEADING = re.compile(r"^(#{1,6}\s+\S.*|\s*=\s+[^=\s].*[^=\s]\s+=\s*|\s*=\s+[^=\s]\s+=\s*)$")


def split_documents(lines: list[str], split: str = "auto") -> list[tuple[int, str]]:
    """(first line number, text) of every document of a raw text file's lines.

    ``blank``: documents are separated by blank lines (paragraphs). ``heading``: a heading line (markdown
    ``# ...`` or WikiText's top-level `` = Title = ``) starts a new document that runs to the next heading, blank
    lines included. ``file``: the whole file is one document. ``auto``: ``heading`` when the file has a heading
    line, else ``blank``. Each document is stripped of surrounding whitespace; empty ones are dropped."""
    if split not in TEXT_SPLITS:
        raise ValueError(f"text split must be one of {TEXT_SPLITS}, got {split!r}")
    if split == "auto":
        split = "heading" if any(_HEADING.match(ln) for ln in lines) else "blank"
    docs: list[tuple[int, list[str]]] = []
    for lineno, line in enumerate(lines, 1):
        if split == "file":
            starts = not docs
        elif split == "heading":
            starts = not docs or bool(_HEADING.match(line))
        else:
            starts = bool(line.strip()) and (not docs or not lines[lineno - 2].strip())
        if starts:
            docs.append((lineno, []))
        if docs and (split != "blank" or line.strip()):
            docs[-1][1].append(line)
    out = []
    for lineno, body in docs:
        text = "\n".join(body).strip()
        if text:
            out.append((lineno + next(i for i, ln in enumerate(body) if ln.strip()), text))
    return out


def read_text_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file (newlines removed); errors name ``path:line``."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"task file not found: {path}") from None
    lines = []
    for lineno, chunk in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(chunk.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return lines


def load_text_file(path: str, name: str | None = None, limit: int | None = None, split: str = "auto") -> Task:
    """A raw ``.txt`` file as a ``rolling_perplexity`` task: one item ``{"text", "line"}`` per document."""
    lines = read_text_lines(path)
    try:
        docs = split_documents(lines, split)
    except ValueError as e:
        raise DataError(str(e)) from None
    if not docs:
        raise DataError(f"{path}: no text (empty file)")
    items = select_items([{"text": t, "line": ln} for ln, t in docs], limit)
    used = split if split != "auto" else ("heading" if any(_HEADING.match(ln) for ln in lines) else "blank")
    return Task(name or name_from_path(path), "rolling_perplexity", str(path), items, len(docs),
                {"split": used})


def name_from_path(path: str | Path) -> str:
    """``dir/my-task.jsonl.gz`` -> ``my-task``."""
    name = Path(path).name
    for ext in (".gz", ".jsonl", ".json", ".txt"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    return name


def load_perplexity_split(path: str, name: str, limit: int | None = None,
                          val_fraction: float = SHARED_VAL_FRACTION) -> Task:
    """The validation records (shared SHA-1 rule at ``val_fraction``: the configs' ``data.val_fraction``) of a
    pretrain file, in file order; ``limit`` of them spread evenly (the whole file is read)."""
    if not Path(path).is_file():
        raise DataError(f"pretrain file not found: {path}")
    items = []
    for key, record in iter_records(str(path), "pretrain"):
        if not is_validation(key, val_fraction) or not key.strip():
            continue
        items.append({"text": record["text"]})
    if not items:
        raise DataError(f"{path}: no validation records (SHA-1 split rule, fraction {val_fraction:.4f}; "
                        "--val_fraction sets it)")
    return Task(name, "perplexity", str(path), select_items(items, limit), len(items),
                {"split": "validation", "val_fraction": val_fraction})


def load_preference_split(path: str, name: str, limit: int | None = None) -> Task:
    """The held-out pairs of a preference file (``PREFERENCE_VAL_FRACTION``, the rule of
    ../shared/data/README.md for its small preference files), in file order; ``limit`` of them spread evenly."""
    if not Path(path).is_file():
        raise DataError(f"preference file not found: {path}")
    items = [r for key, r in iter_records(str(path), "preference") if is_validation(key, PREFERENCE_VAL_FRACTION)]
    if not items:
        raise DataError(f"{path}: no held-out pairs (SHA-1 split rule, fraction {PREFERENCE_VAL_FRACTION})")
    return Task(name, "preference", str(path), select_items(items, limit), len(items), {"split": "validation"})


def resolve_task(spec: str, root: str | Path | None = None, limit: int | None = None,
                 text_split: str = "auto", val_fraction: float = SHARED_VAL_FRACTION) -> Task:
    """A task from a command-line argument (a known name, ``ppl-<source>``, ``ppl:<file>`` or a file path; a
    ``.txt`` file is a ``rolling_perplexity`` task split into documents by ``text_split``). ``val_fraction``: the
    held-out share of ``ppl:<file>`` records (the shared rule by default; the tiny configs hold out 0.05)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    root = data_root(str(root) if root else None)
    if spec.startswith("ppl:"):
        path = spec[len("ppl:"):]
        return load_perplexity_split(path, "ppl:" + name_from_path(path), limit, val_fraction)
    if spec.startswith("pref:"):
        path = spec[len("pref:"):]
        return load_preference_split(path, "pref:" + name_from_path(path), limit)
    if spec.startswith("pref-") and (root / "pref" / f"{spec[len('pref-'):]}.jsonl.gz").is_file():
        return load_preference_split(str(root / "pref" / f"{spec[len('pref-'):]}.jsonl.gz"), spec, limit)
    if spec.startswith("ppl-"):
        path = root / "pretrain" / f"{spec[len('ppl-'):]}.jsonl.gz"
        if path.is_file():
            return load_perplexity_split(str(path), spec, limit)
    elif "/" not in spec and not spec.endswith((".jsonl", ".gz")):
        path = root / "eval" / f"{spec}.jsonl.gz"
        if path.is_file():
            return load_task_file(str(path), spec, limit)
    if Path(spec).is_file():
        if spec.endswith(".txt"):
            return load_text_file(spec, None, limit, text_split)
        return load_task_file(spec, None, limit)
    if "/" in spec or spec.endswith((".jsonl", ".gz", ".json", ".txt")):
        raise DataError(f"task file not found: {spec}")
    known = known_tasks(root)
    raise DataError(f"unknown task {spec!r}: not a file and not a task under the data root {root} "
                    f"(--data_root or NANOLLADA_DATA); known tasks: {', '.join(known) or 'none found'}; "
                    "or give ppl:<pretrain file>, pref:<preference file> or a path to a jsonl/jsonl.gz task file "
                    "or a .txt file")
