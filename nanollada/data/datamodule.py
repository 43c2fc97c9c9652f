"""One LightningDataModule for pretraining, SFT and preference jsonl, shared by every paradigm.

Files are tokenized once into token caches (``cache.py``); training rows come from an infinite, seeded, resumable
stream (``MixtureSampler``) whose position is derived from the trainer's global step, so ``--ckpt_path last``
continues on exactly the next batch. The collate function is chosen by the model (``collate_cls``), so AR and
diffusion see the same files, rows and order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from nanollada.data.cache import TokenCache, build_cache
from nanollada.data.preference import PreferencePairs
from nanollada.data.records import KINDS, SHARED_VAL_FRACTION, DataError
from nanollada.errors import ConfigError
from nanollada.tokenizer import Tokenizer

CUT_WARN_SHARE = 0.1  # warn when this share of a split's SFT rows lost every answer token to the seq_len cut


class PackedRows(Dataset):
    """Fixed-length rows of ``seq_len + 1`` tokens cut back to back from a token stream, with document ids.

    Item: ``{"tokens": (L+1,) long, "doc_ids": (L+1,) long}``; row i covers stream positions [i*L, i*L + L].
    """

    def __init__(self, cache: TokenCache, seq_len: int):
        self.cache, self.seq_len = cache, seq_len
        self.n = max(0, (len(cache.tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.seq_len
        pos = np.arange(start, start + self.seq_len + 1)
        docs = np.searchsorted(self.cache.offsets, pos, side="right") - 1
        tokens = np.asarray(self.cache.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        return {"tokens": torch.from_numpy(tokens), "doc_ids": torch.from_numpy(docs - docs[0])}


class Conversations(Dataset):
    """One rendered SFT conversation per item: ``{"tokens": (n,) long, "loss_mask": (n,) bool}``."""

    def __init__(self, cache: TokenCache):
        self.cache = cache

    def __len__(self) -> int:
        return self.cache.n_docs

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a, b = int(self.cache.offsets[i]), int(self.cache.offsets[i + 1])
        return {"tokens": torch.from_numpy(np.asarray(self.cache.tokens[a:b], dtype=np.int64)),
                "loss_mask": torch.from_numpy(np.asarray(self.cache.mask[a:b], dtype=np.bool_))}


def answer_tokens(cache: TokenCache) -> np.ndarray:
    """Loss-mask tokens (answer content + ``<|im_end|>``) of every document of an SFT cache split, (n_docs,) int64."""
    lengths = np.diff(cache.offsets)
    out = np.zeros(len(lengths), dtype=np.int64)
    nonempty = lengths > 0
    if nonempty.any():  # reduceat sums mask[start_i:start_(i+1)]; an empty document (none in practice) adds none
        out[nonempty] = np.add.reduceat(cache.mask, cache.offsets[:-1][nonempty], dtype=np.int64)
    return out


class MixtureSampler(Sampler[int]):
    """Infinite stream of indices into a ConcatDataset of files, mixed by weight, deterministic and resumable.

    Epoch e is a shuffle (seed, e) of every file's rows, file i contributing ``round(weight_i * n_i)`` rows (rows
    repeat when weight > 1). Global stream position p goes to rank ``p % world_size``; ``start`` skips the first
    ``start`` global positions (the samples already consumed by all ranks).
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int = 0, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not any(n > 0 and w > 0 for n, w in zip(sizes, weights)):
            raise DataError(f"no training rows: every file is empty or has weight 0 (sizes {sizes}, weights "
                            f"{weights}; is data.seq_len too long for the files?)")
        self.sizes, self.weights, self.seed = sizes, weights, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        parts = []
        for off, n, w in zip(self.offsets, self.sizes, self.weights):
            count = int(round(w * n)) if n else 0
            if count:
                reps = -(-count // n)
                parts.append(off + torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:count])
        order = torch.cat(parts)
        return order[torch.randperm(len(order), generator=g)]

    def __iter__(self) -> Iterator[int]:
        pos = self.start + self.rank
        epoch, epoch_start = 0, 0
        order = self.epoch_order(0)
        while True:
            while pos >= epoch_start + len(order):
                epoch_start += len(order)
                epoch += 1
                order = self.epoch_order(epoch)
            yield int(order[pos - epoch_start])
            pos += self.world_size


class IndexedRows(Dataset):
    """The rows ``indices`` of ``rows``, each item a dict with its global row index added as ``"row_index"``.

    Validation tags every row with its index in the whole (capped) validation set, so a model can seed per-row
    randomness (the diffusion ELBO's masks) by the row itself: the estimate then does not depend on the batch size,
    the batch a row lands in or the number of ranks.
    """

    def __init__(self, rows: Dataset, indices: Sequence[int]):
        self.rows, self.indices = rows, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        return {**self.rows[self.indices[k]], "row_index": self.indices[k]}


class RowIndexCollate:
    """Wraps a collate: the batch also carries ``"row_index"`` (B,) long, the items' global row indices."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items: list[dict]) -> dict:
        index = torch.tensor([item.pop("row_index") for item in items], dtype=torch.long)
        return {**self.collate(items), "row_index": index}


class LMDataModule(L.LightningDataModule):
    """Pretraining or SFT jsonl(.gz) files, tokenized, cached, split and batched for either paradigm.

    Args:
        train_files: jsonl or jsonl.gz files; relative paths are resolved against ``data_root`` when it is set.
        kind: ``pretrain`` ({"text"} records, packed rows), ``sft`` ({"conversations"} records, one per row) or
            ``preference`` ({"chosen", "rejected"} conversations sharing a prompt, MiniMind's ``dpo.jsonl``; one
            pair per item, for the DPO modules of ``nanollada.lm.dpo``; see ``data/preference.py``).
        weights: Mixing weight per file (rows per epoch = weight x rows in the file); default 1 each.
        data_root: Directory that relative ``train_files`` live in (e.g. ``../shared/data``); the
            ``NANOLLADA_DATA`` environment variable overrides it.
        tokenizer: SentencePiece model file or directory; default: the tokenizer shipped with nanollada.
        seq_len: Tokens per training row (pretrain rows are packed to exactly this; SFT rows are truncated to it;
            preference pairs are cut to it with the prompt kept shared, ``preference.truncate_pair``); at most the
            model's ``max_seq_len``. SFT: a split whose every conversation lost all its answer tokens to the cut is
            refused; 10% or more such rows print a warning (``check_answers``).
        batch_size: Rows per batch per device.
        val_fraction: Share of records held out by the SHA-1 rule; 2/256 is ../shared/data/README.md's split
            (0.125 its rule for the small preference files).
        max_val_rows: Cap on validation rows (evenly spaced over all files, the same for every model); None = all.
        cache_dir: Where token caches are written.
        skip_bad_lines: Skip malformed lines (counted in the log) instead of stopping with file:line.
        num_workers: DataLoader worker processes.
        seed: Seed of the training order.
        predict_file: Prompts for ``nanollada predict --config ...``: a .txt file (one prompt per line) or a .jsonl
            file (``{"prompt": ...}`` per line); answers are written in this order.
    """

    def __init__(self, train_files: list[str], kind: Literal["pretrain", "sft", "preference"] = "pretrain",
                 weights: list[float] | None = None, data_root: str | None = None, tokenizer: str | None = None,
                 seq_len: int = 256, batch_size: int = 16, val_fraction: float = SHARED_VAL_FRACTION,
                 max_val_rows: int | None = None, cache_dir: str = "data/cache", skip_bad_lines: bool = False,
                 num_workers: int = 0, seed: int = 0, predict_file: str | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"data.kind must be one of {KINDS}, got {kind!r}")
        if weights is not None and len(weights) != len(train_files):
            raise ConfigError(f"data.weights: {len(weights)} weights for {len(train_files)} train_files")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {seq_len}")
        self.save_hyperparameters()
        root = os.environ.get("NANOLLADA_DATA") or data_root
        self.files = [f if root is None or os.path.isabs(f) else os.path.join(root, f) for f in train_files]
        self.weights = list(weights) if weights is not None else [1.0] * len(train_files)
        self.kind, self.seq_len, self.batch_size = kind, seq_len, batch_size
        try:
            self.tokenizer = Tokenizer(tokenizer)
        except FileNotFoundError as e:
            raise ConfigError(f"data.tokenizer: {e}") from None
        self.train_set = self.val_set = None

    def cache_jobs(self) -> list[dict]:
        """``build_cache`` arguments of every file, in order: the one definition of this data's cache keys
        (``nanollada prepare --config`` builds exactly these)."""
        max_len = None if self.kind == "pretrain" else self.seq_len  # conversations and pairs are cut to seq_len
        return [dict(path=f, kind=self.kind, tokenizer=self.tokenizer, cache_root=self.hparams.cache_dir,
                     val_fraction=self.hparams.val_fraction, skip_bad_lines=self.hparams.skip_bad_lines,
                     max_len=max_len) for f in self.files]

    def _cache_dirs(self) -> list:
        return [build_cache(**job) for job in self.cache_jobs()]

    def _predicting(self) -> bool:
        return self.trainer is not None and self.trainer.state.fn == "predict"

    def check_fits_model(self) -> None:
        """``data.seq_len`` must fit the attached model's ``max_seq_len`` (checked before any caching or forward)."""
        model = getattr(self.trainer, "lightning_module", None)
        limit = getattr(getattr(model, "config", None), "max_seq_len", None)
        if limit is not None and self.seq_len > limit:
            raise ConfigError(f"data.seq_len {self.seq_len} is longer than model.max_seq_len {limit} (the positions "
                              f"the model covers): set data.seq_len <= {limit}, or raise model.max_seq_len")

    def prepare_data(self) -> None:
        if not self._predicting():  # predict reads prompts, not the training corpora
            self.check_fits_model()
            self._cache_dirs()

    def _datasets(self, split: str) -> list[Dataset]:
        caches = [TokenCache(d, split) for d in self._cache_dirs()]
        if self.kind == "pretrain":
            return [PackedRows(c, self.seq_len) for c in caches]
        if self.kind == "preference":
            return [PreferencePairs(c) for c in caches]
        return [Conversations(c) for c in caches]

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return
        self.check_fits_model()
        if self.train_set is None:
            self.train_parts = self._datasets("train")
            self.train_set = ConcatDataset(self.train_parts)
            val = ConcatDataset(self._datasets("val"))
            n = len(val) if self.hparams.max_val_rows is None else min(len(val), self.hparams.max_val_rows)
            # evenly spaced rows, so a capped validation set still covers every file (and language) of the mix
            self.val_set = torch.utils.data.Subset(val, np.linspace(0, len(val) - 1, n).round().astype(int).tolist()
                                                   if n else [])
        if self.kind == "sft":
            if stage in ("fit", None):
                self.check_answers("train", self.train_parts)
            self.check_answers("val", self.val_set.dataset.datasets, self.val_set.indices)

    def check_answers(self, split: str, parts: list[Conversations], rows: Sequence[int] | None = None) -> None:
        """SFT rows whose answers were all cut away by ``seq_len`` (prompt longer than it) carry no loss: refuse a
        split (``rows`` of it) without a single answer token, warn when at least ``CUT_WARN_SHARE`` of it is such
        rows."""
        counts = np.concatenate([answer_tokens(p.cache) for p in parts])
        if rows is not None:
            counts = counts[np.asarray(rows, dtype=np.int64)]
        n, empty = len(counts), int((counts == 0).sum())
        if n == 0 or empty < CUT_WARN_SHARE * n:
            return
        cut = sum(int(p.cache.meta["truncated"]) for p in parts)
        records = sum(int(p.cache.meta["records"]) for p in parts)
        where = (f"of {', '.join(self.files)} (data.seq_len={self.seq_len}; {cut:,} of the files' {records:,} "
                 "conversations were cut to it)")
        if empty == n:
            raise DataError(f"no answer tokens in the {split} rows {where}: all {n:,} {split} conversations lost every "
                            "answer token to the cut (prompts longer than seq_len), so the loss would be 0; raise "
                            "data.seq_len or shorten the prompts")
        if getattr(self.trainer, "is_global_zero", True):
            print(f"[nanollada] warning: {empty:,} of {n:,} {split} conversations ({empty / n:.0%}) lost every answer "
                  f"token to the cut and add nothing to the loss {where}", file=sys.stderr)

    def _collate(self):
        cls = getattr(self.trainer.lightning_module, "collate_cls", None) if self.trainer else None
        if cls is None:
            raise RuntimeError("the model must define collate_cls (ARCollate or DiffusionCollate)")
        return cls(self.kind, self.tokenizer.pad_id, self.tokenizer.eos_id, max_len=self.seq_len)

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        consumed = t.global_step * t.accumulate_grad_batches * self.batch_size * t.world_size
        sampler = MixtureSampler([len(d) for d in self.train_parts], self.weights, self.hparams.seed, consumed,
                                 t.global_rank, t.world_size)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=self._collate(),
                          num_workers=self.hparams.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.hparams.num_workers > 0)

    def _eval_loader(self) -> DataLoader:
        """The validation rows of this rank: rows r, r + W, r + 2W, ... (the CLI sets ``use_distributed_sampler:
        false``), so the ranks' shards partition the rows and the summed metrics equal one process's. Batches carry
        ``row_index`` (the rows' global indices) for per-row seeding.
        ``trainer.limit_val_batches`` caps batches per rank; ``max_val_rows`` is the cap that ignores the device count.
        """
        if len(self.val_set) == 0:
            raise DataError(f"no validation rows in {', '.join(self.files)} (data.val_fraction="
                            f"{self.hparams.val_fraction}); raise val_fraction or give longer files")
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        rows = IndexedRows(self.val_set, range(rank, len(self.val_set), world))
        return DataLoader(rows, batch_size=self.batch_size, shuffle=False, collate_fn=RowIndexCollate(self._collate()),
                          num_workers=self.hparams.num_workers, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        from nanollada.prediction import PromptDataset, collate_prompts
        if not self.hparams.predict_file:
            raise ValueError("nanollada predict --config needs --data.predict_file FILE (.txt or .jsonl prompts)")
        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        return DataLoader(PromptDataset(self.hparams.predict_file, rank, world), batch_size=self.batch_size,
                          shuffle=False, collate_fn=collate_prompts)
