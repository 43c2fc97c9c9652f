"""Token caches: each jsonl(.gz) file is tokenized once, streaming, into flat numpy memmaps.

Layout of one cache directory (keyed on tokenizer fingerprint, file content hash, kind and split rule)::

    meta.json                 counts: records, tokens, characters, skipped/truncated lines
    {train,val}.tokens.bin    all token ids back to back (uint16 when the vocabulary fits, else uint32)
    {train,val}.offsets.npy   int64 (n_docs + 1,): document d is tokens[offsets[d]:offsets[d+1]]
    {train,val}.mask.bin      SFT and preference, uint8 loss mask aligned with tokens (assistant content + <|im_end|>)

A pretrain document is ``[bos] + text + [eos]``; an SFT document is the chat-template rendering; a preference pair
is two documents, chosen then rejected, each prompt + response with the response as its mask (``preference.py``).
Caches are built in a temporary directory and renamed into place, so an interrupted build never leaves a half-written
cache, and a second run (or another process) starts at once. Memmaps mean a corpus larger than memory still trains.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from nanollada.data.preference import preference_documents
from nanollada.data.records import DataError, ReadStats, is_validation, iter_records
from nanollada.errors import UserError
from nanollada.tokenizer import Tokenizer

CACHE_VERSION = 2  # 2: special pieces typed in the text are encoded as plain text (Tokenizer.encode)
SPLITS = ("train", "val")


def file_digest(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def cache_key(path: str, kind: str, tokenizer: Tokenizer, val_fraction: float, max_len: int | None) -> str:
    spec = f"v{CACHE_VERSION}|{kind}|{tokenizer.fingerprint()}|{file_digest(path)}|{val_fraction!r}|{max_len}"
    return f"{Path(path).name.split('.')[0]}-{kind}-{hashlib.sha1(spec.encode()).hexdigest()[:12]}"


class _SplitWriter:
    def __init__(self, directory: Path, split: str, dtype, with_mask: bool):
        self.tokens = open(directory / f"{split}.tokens.bin", "wb")
        self.mask = open(directory / f"{split}.mask.bin", "wb") if with_mask else None
        self.directory, self.split, self.dtype = directory, split, dtype
        self.offsets, self.n_tokens, self.chars = [0], 0, 0

    def add(self, ids: list[int], mask: list[bool] | None, n_chars: int) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self.tokens)
        if self.mask is not None:
            np.asarray(mask, dtype=np.uint8).tofile(self.mask)
        self.n_tokens += len(ids)
        self.offsets.append(self.n_tokens)
        self.chars += n_chars

    def close(self) -> dict:
        self.tokens.close()
        if self.mask is not None:
            self.mask.close()
        np.save(self.directory / f"{self.split}.offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        return {"documents": len(self.offsets) - 1, "tokens": self.n_tokens, "characters": self.chars}


class MissingDataFile(UserError, FileNotFoundError):
    """A data file that is not there (the message is ``missing_data_message``)."""


def no_records_error(path: str, kind: str, skipped: int) -> DataError:
    """The error for a data file without a single usable record (empty, or every line skipped)."""
    why = f"all {skipped} non-blank lines were malformed and skipped (skip_bad_lines)" if skipped else \
        "the file is empty or holds only blank lines"
    return DataError(f"{path}: no records: {why}; give a {kind} jsonl file with at least one record")


def missing_data_message(path: str) -> str:
    """The error for a data file that is not there: the path as given, where it resolved, and how to fix it."""
    return (f"data file not found: {path} (resolved to {os.path.abspath(path)}); check the config's data paths, "
            "data.data_root, or the NANOLLADA_DATA environment variable (the shared corpora's directory)")


def build_cache(path: str, kind: str, tokenizer: Tokenizer, cache_root: str, val_fraction: float,
                skip_bad_lines: bool = False, max_len: int | None = None, log=print,
                progress: Callable[[int], None] | None = None) -> Path:
    """Tokenize ``path`` into ``cache_root/<key>/`` unless that cache exists; return the directory.

    ``max_len`` truncates SFT conversations (counted in meta.json as ``truncated``). ``progress(n)`` is called after
    each record read while building (n = records so far; e.g. ``nanollada prepare``'s progress lines). A missing
    file raises ``MissingDataFile``, a file without records ``DataError``.
    """
    if not os.path.isfile(path):
        raise MissingDataFile(missing_data_message(path))
    final = Path(cache_root) / cache_key(path, kind, tokenizer, val_fraction, max_len)
    if (final / "meta.json").is_file():
        meta = json.loads((final / "meta.json").read_text())
        if meta["records"] == 0:  # a cache built before empty files were refused
            raise no_records_error(path, kind, meta["skipped"])
        return final
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    writers = {s: _SplitWriter(tmp, s, dtype, with_mask=kind != "pretrain") for s in SPLITS}
    stats, truncated, start = ReadStats(), 0, time.time()
    batch: list[tuple[str, dict]] = []

    def flush():
        nonlocal truncated
        if kind == "preference":  # two documents per pair, cut to max_len inside (the prompt stays shared)
            for key, rec in batch:
                docs, cut = preference_documents(tokenizer, rec, max_len)
                truncated += cut
                for (ids, mask), conv in zip(docs, (rec["chosen"], rec["rejected"][-1:])):
                    writers["val" if is_validation(key, val_fraction) else "train"].add(
                        ids, mask, sum(len(m["content"]) for m in conv))
            batch.clear()
            return
        if kind == "pretrain":
            encoded = tokenizer.encode_batch([rec["text"] for _, rec in batch])
            rendered = [([tokenizer.bos_id] + ids + [tokenizer.eos_id], None) for ids in encoded]
        else:
            rendered = [tokenizer.render_chat(rec["conversations"]) for _, rec in batch]
        for (key, rec), (ids, mask) in zip(batch, rendered):
            if max_len is not None and len(ids) > max_len:
                ids, mask, truncated = ids[:max_len], mask[:max_len], truncated + 1
            n_chars = sum(len(m["content"]) for m in rec["conversations"]) if kind == "sft" else len(rec["text"])
            writers["val" if is_validation(key, val_fraction) else "train"].add(ids, mask, n_chars)
        batch.clear()

    try:
        for n, item in enumerate(iter_records(path, kind, skip_bad_lines, stats), 1):
            if progress is not None:
                progress(n)
            batch.append(item)
            if len(batch) == 512:
                flush()
        flush()
        if stats.records == 0:
            raise no_records_error(path, kind, stats.skipped)
        meta = {"file": str(path), "kind": kind, "tokenizer": tokenizer.fingerprint(), "vocab_size":
                tokenizer.vocab_size, "dtype": np.dtype(dtype).name, "val_fraction": val_fraction,
                "truncated": truncated, **{k: v for k, v in asdict(stats).items()},
                **{s: w.close() for s, w in writers.items()}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        if final.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = meta["train"]["tokens"] + meta["val"]["tokens"]
    log(f"[nanollada] cached {path}: {stats.records} records, {n:,} tokens "
        f"({(meta['train']['characters'] + meta['val']['characters']) / max(n, 1):.2f} chars/token), "
        f"{stats.skipped} skipped lines, {truncated} truncated, {time.time() - start:.1f}s -> {final}")
    for reason in stats.skipped_examples:
        log(f"[nanollada]   skipped {reason}")
    return final


class TokenCache:
    """Read-only view of one split of a cache directory."""

    def __init__(self, directory: str | Path, split: str):
        directory = Path(directory)
        self.meta = json.loads((directory / "meta.json").read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.offsets = np.load(directory / f"{split}.offsets.npy")
        n = int(self.offsets[-1])
        self.tokens = np.memmap(directory / f"{split}.tokens.bin", dtype=dtype, mode="r", shape=(n,)) if n else \
            np.zeros(0, dtype=dtype)
        mask_path = directory / f"{split}.mask.bin"
        self.mask = (np.memmap(mask_path, dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)) \
            if mask_path.exists() else None

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1
