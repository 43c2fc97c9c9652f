"""Tokenize pretrain/SFT jsonl(.gz) files into token caches once, ahead of training, and summarise them.

``nanollada prepare --config configs/real/ar_pretrain.yaml`` builds exactly the caches that ``nanollada fit`` with
that config would build (same files, kind, tokenizer, validation split and SFT truncation, so the cache keys match
and training starts at once), or ``nanollada prepare --files a.jsonl.gz b.jsonl --kind sft`` any set of files. A
second run finds every cache and only prints the summary. Caches are built by ``nanollada.data.cache.build_cache``
(streaming, atomic); this module only adds a progress line every ``progress_every`` records (through
``build_cache``'s ``progress`` callback) and the summary:

    | file | language | kind | train docs | val docs | tokens | val tokens | characters | chars/token | skipped | ...

with one total row per language (``en`` / ``zh`` from the file name: ``en-gutenberg``, ``alpaca-en``,
``sharegpt-zh-1k``) and, for a config, the mixture's tokens per epoch and the run's token budget
(``max_steps x batch_size x accumulate_grad_batches x seq_len`` for pretraining).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nanollada.data.cache import build_cache, cache_key, missing_data_message
from nanollada.data.records import KINDS, SHARED_VAL_FRACTION
from nanollada.tokenizer import Tokenizer


@dataclass
class FileSummary:
    """What one file's cache holds (train + validation split)."""

    file: str
    language: str
    kind: str
    weight: float
    train_docs: int
    val_docs: int
    tokens: int
    val_tokens: int
    characters: int
    skipped: int
    truncated: int
    reused: bool
    seconds: float
    cache: str

    @property
    def chars_per_token(self) -> float:
        return self.characters / max(self.tokens, 1)


@dataclass
class PrepareResult:
    files: list[FileSummary]
    tokenizer: str
    vocab_size: int
    budget: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"tokenizer": self.tokenizer, "vocab_size": self.vocab_size, "budget": self.budget,
                "files": [dict(asdict(f), chars_per_token=round(f.chars_per_token, 4)) for f in self.files]}


def language(path: str | os.PathLike) -> str:
    """``en`` / ``zh`` from a dash-separated part of the file name (en-gutenberg, alpaca-en, sharegpt-zh-1k)."""
    parts = Path(path).name.split(".")[0].split("-")
    return next((p for p in parts if p in ("en", "zh")), "other")


def progress_printer(name: str, every: int, log):
    """A ``build_cache`` progress callback logging a line every ``every`` records (None when ``every`` <= 0)."""
    if not every or every <= 0:
        return None
    start = time.time()

    def progress(n: int) -> None:
        if n % every == 0:
            log(f"[prepare] {name}: {n:,} records read, {n / max(time.time() - start, 1e-9):,.0f}/s")
    return progress


def prepare_files(files: Sequence[str], kind: str, tokenizer: str | os.PathLike | Tokenizer | None = None,
                  cache_dir: str = "data/cache", val_fraction: float = SHARED_VAL_FRACTION,
                  skip_bad_lines: bool = False, max_len: int | None = None, weights: Sequence[float] | None = None,
                  progress_every: int = 20_000, log=print) -> PrepareResult:
    """Build (or find) the token cache of every file and return per-file summaries.

    ``max_len`` must equal the training config's ``seq_len`` for SFT (LMDataModule truncates SFT conversations to
    it and it is part of the cache key); pretraining caches use None.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    jobs = [dict(path=f, kind=kind, tokenizer=tok, cache_root=cache_dir, val_fraction=val_fraction,
                 skip_bad_lines=skip_bad_lines, max_len=max_len) for f in files]
    return prepare_jobs(jobs, weights, progress_every, log)


def prepare_jobs(jobs: Sequence[dict], weights: Sequence[float] | None = None, progress_every: int = 20_000,
                 log=print) -> PrepareResult:
    """Build (or find) the caches of ``build_cache`` argument dicts (``LMDataModule.cache_jobs()``) and summarise."""
    if weights is not None and len(weights) != len(jobs):
        raise ValueError(f"{len(weights)} weights for {len(jobs)} files")
    out = []
    for i, job in enumerate(jobs):
        f, tok = job["path"], job["tokenizer"]
        if not os.path.isfile(f):
            raise FileNotFoundError(missing_data_message(f))
        reused = (Path(job["cache_root"]) / cache_key(f, job["kind"], tok, job["val_fraction"], job["max_len"])
                  / "meta.json").is_file()
        start = time.time()
        d = build_cache(**job, log=log, progress=progress_printer(Path(f).name, progress_every, log))
        meta = json.loads((d / "meta.json").read_text())
        tr, va = meta["train"], meta["val"]
        out.append(FileSummary(
            file=str(f), language=language(f), kind=job["kind"],
            weight=float(weights[i]) if weights is not None else 1.0,
            train_docs=tr["documents"], val_docs=va["documents"], tokens=tr["tokens"] + va["tokens"],
            val_tokens=va["tokens"], characters=tr["characters"] + va["characters"], skipped=meta["skipped"],
            truncated=meta["truncated"], reused=reused, seconds=round(time.time() - start, 2), cache=str(d)))
    tok = jobs[0]["tokenizer"] if jobs else Tokenizer()
    return PrepareResult(out, str(tok.path), tok.vocab_size)


def token_budget(result: PrepareResult, config: dict) -> dict:
    """Mixture tokens per epoch and the run's training tokens for a fit config (``trainer`` + ``data`` sections)."""
    data, trainer = config.get("data", {}), config.get("trainer", {})
    per_epoch = {lang: 0 for lang in sorted({f.language for f in result.files})}
    for f in result.files:
        per_epoch[f.language] += round(f.weight * (f.tokens - f.val_tokens))
    steps = trainer.get("max_steps") or 0
    rows = steps * data.get("batch_size", 16) * (trainer.get("accumulate_grad_batches") or 1) * \
        (trainer.get("devices") if isinstance(trainer.get("devices"), int) else 1)
    budget = {"epoch_tokens": sum(per_epoch.values()), "epoch_tokens_by_language": per_epoch,
              "max_steps": steps, "rows": rows}
    if result.files and result.files[0].kind == "pretrain":
        budget["train_tokens"] = rows * data.get("seq_len", 256)
        budget["epochs"] = budget["train_tokens"] / max(budget["epoch_tokens"], 1)
    else:  # SFT: one conversation a row; preference: one pair (two cached documents) a row
        per_row = 2 if result.files and result.files[0].kind == "preference" else 1
        docs = sum(round(f.weight * f.train_docs / per_row) for f in result.files)
        budget["epoch_conversations"] = docs
        budget["epochs"] = rows / max(docs, 1)
    return budget


def format_summary(result: PrepareResult) -> str:
    """Markdown table: one row per file, one total per language, then the overall total (and the token budget)."""
    head = ("| file | language | kind | weight | train docs | val docs | tokens | val tokens | characters | chars/token "
            "| skipped | truncated | cache |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]

    def row(name, lang, kind, weight, fs: list[FileSummary], cache=""):
        tokens, chars = sum(f.tokens for f in fs), sum(f.characters for f in fs)
        return (f"| {name} | {lang} | {kind} | {weight} | {sum(f.train_docs for f in fs):,} | "
                f"{sum(f.val_docs for f in fs):,} | {tokens:,} | {sum(f.val_tokens for f in fs):,} | {chars:,} | "
                f"{chars / max(tokens, 1):.3f} | {sum(f.skipped for f in fs):,} | {sum(f.truncated for f in fs):,} "
                f"| {cache} |")

    for f in result.files:
        rows.append(row(Path(f.file).name, f.language, f.kind, f"{f.weight:g}", [f],
                        ("reused" if f.reused else f"built {f.seconds:.0f}s")))
    langs = sorted({f.language for f in result.files})
    for lang in langs:
        rows.append(row(f"**{lang} total**", lang, "", "", [f for f in result.files if f.language == lang]))
    if len(langs) > 1:
        rows.append(row("**total**", "", "", "", result.files))
    text = f"tokenizer {result.tokenizer} (vocab {result.vocab_size})\n\n" + "\n".join(rows)
    b = result.budget
    if b:
        by_lang = ", ".join(f"{k} {v:,}" for k, v in b["epoch_tokens_by_language"].items())
        text += f"\n\nmixture epoch (weight x training tokens): {b['epoch_tokens']:,} tokens ({by_lang})"
        if "train_tokens" in b:
            text += (f"; budget: {b['max_steps']:,} steps x {b['rows'] // max(b['max_steps'], 1):,} rows = "
                     f"{b['train_tokens']:,} tokens = {b['epochs']:.2f} mixture epochs")
        elif b["max_steps"]:
            text += (f"; budget: {b['max_steps']:,} steps x {b['rows'] // max(b['max_steps'], 1):,} conversations "
                     f"= {b['epochs']:.2f} epochs of {b['epoch_conversations']:,} weighted conversations")
    return text


def resolve_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict:
    """A fit config's ``data`` section resolved as ``nanollada fit`` resolves it, plus its ``trainer`` section.

    ``data`` is parsed by jsonargparse against ``LMDataModule``'s signature: its defaults fill the keys the YAML
    leaves out, types are checked and unknown keys are errors, and LightningCLI-style ``--data.KEY=VALUE``
    overrides apply in order. ``trainer`` (only read for the token budget) is the YAML's, with ``--trainer.KEY=VALUE``
    overrides. Other overrides (``--model.*``) do not concern the data and are ignored.
    """
    import yaml
    from jsonargparse import ArgumentParser
    from jsonargparse import ArgumentError as ParseError

    from nanollada.data.datamodule import LMDataModule
    config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(config.get("data"), dict) or not config["data"].get("train_files"):
        raise ValueError(f"{path}: no data.train_files")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LMDataModule, "data")
    try:
        ns = parser.parse_args([f"--data={json.dumps(config['data'])}",
                                *(a for a in overrides if a.startswith("--data."))])
    except ParseError as e:
        raise ValueError(f"{path}: data section: {e}".replace("\n", " ")) from None
    trainer = dict(config.get("trainer") or {})
    for a in overrides:
        if a.startswith("--trainer."):
            key, _, value = a[len("--trainer."):].partition("=")
            trainer[key] = yaml.safe_load(value)
    return {"data": ns.data.as_dict(), "trainer": trainer}


def resolve_files(files: Sequence[str], data_root: str | None) -> list[str]:
    """Relative files against ``$NANOLLADA_DATA`` or ``data_root`` (LMDataModule's rule)."""
    root = os.environ.get("NANOLLADA_DATA") or data_root
    return [f if root is None or os.path.isabs(f) else os.path.join(root, f) for f in files]


def prepare_config(path: str | os.PathLike, cache_dir: str | None = None, tokenizer: str | None = None,
                   progress_every: int = 20_000, log=print, overrides: Sequence[str] = ()) -> PrepareResult:
    """The caches ``nanollada fit --config path [overrides]`` builds: the data section resolved by
    ``resolve_config``, an ``LMDataModule`` built from it and its own ``cache_jobs()`` (so the cache keys are the
    datamodule's by construction). ``cache_dir`` / ``tokenizer`` override the config's."""
    from nanollada.data.datamodule import LMDataModule
    overrides = list(overrides) + [f"--data.{k}={v}" for k, v in (("cache_dir", cache_dir), ("tokenizer", tokenizer))
                                   if v]
    config = resolve_config(path, overrides)
    dm = LMDataModule(**config["data"])
    result = prepare_jobs(dm.cache_jobs(), dm.weights, progress_every, log)
    result.budget = token_budget(result, config)
    return result


def prepare_command(argv: list[str]) -> None:
    """tokenize pretrain/SFT files into token caches once (from fit configs or a file list) and summarise them"""
    import argparse

    from nanollada.cli_help import HelpFormatter
    parser = argparse.ArgumentParser(prog="nanollada prepare", description=prepare_command.__doc__,
                                     formatter_class=HelpFormatter, epilog=(
        "With --config the caches match what `nanollada fit --config` builds (same cache keys), so training starts "
        "at once. Relative files resolve against $NANOLLADA_DATA, else the config's data.data_root / --data_root."))
    parser.add_argument("--config", action="append", default=[], help="fit config(s) (YAML); repeatable")
    parser.add_argument("--files", nargs="+", default=[], help="pretrain or SFT jsonl(.gz) files")
    parser.add_argument("--kind", choices=list(KINDS), default=None, help="kind of --files (needed with --files)")
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="mixing weights of --files, one per "
                        "file (default: 1 each)")
    parser.add_argument("--tokenizer", default=None, help="model file or directory (default: the config's, "
                        "else the shipped one)")
    parser.add_argument("--cache_dir", default=None, help="cache directory (default: the config's, else data/cache)")
    parser.add_argument("--data_root", default=None, help="directory relative --files live in; "
                        "$NANOLLADA_DATA overrides it (default: the working directory)")
    parser.add_argument("--val_fraction", type=float, default=SHARED_VAL_FRACTION,
                        help="share of the --files records held out for validation by the SHA-1 rule (a --config "
                             "uses its data.val_fraction) (default: 2/256, ../shared/data's split)")
    parser.add_argument("--max_len", type=int, default=None, help="SFT: truncate conversations of --files to this "
                        "many tokens (= a config's data.seq_len, part of the cache key) (default: no truncation)")
    parser.add_argument("--skip_bad_lines", action="store_true",
                        help="skip malformed lines of --files, counted in the summary, instead of stopping at the "
                             "first with file:line (a --config uses its data.skip_bad_lines)")
    parser.add_argument("--progress_every", type=int, default=20_000, help="records between progress lines (0: off)")
    parser.add_argument("--json", default=None, help="write the summaries as JSON to this file "
                        "(default: none)")
    parser.add_argument("--markdown", default=None, help="write the summary tables to this "
                        "markdown file (default: none)")
    args = parser.parse_args(argv)
    if not args.config and not args.files:
        parser.error("give --config YAML or --files ... --kind pretrain|sft")
    if args.files and not args.kind:
        parser.error("--files needs --kind pretrain|sft")
    results, sections = [], []
    try:
        for c in args.config:
            r = prepare_config(c, args.cache_dir, args.tokenizer, args.progress_every)
            results.append((c, r))
        if args.files:
            r = prepare_files(resolve_files(args.files, args.data_root), args.kind, args.tokenizer,
                              args.cache_dir or "data/cache", args.val_fraction, args.skip_bad_lines, args.max_len,
                              args.weights, args.progress_every)
            results.append(("--files", r))
    except (FileNotFoundError, ValueError) as e:  # DataError is a ValueError
        raise SystemExit(f"nanollada prepare: {e}")
    for name, r in results:
        sections.append(f"### {name}\n\n{format_summary(r)}\n")
    text = "\n".join(sections)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps({n: r.to_dict() for n, r in results}, indent=1, ensure_ascii=False),
                                   encoding="utf-8")
