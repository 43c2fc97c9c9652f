"""Paradigm-specific collate functions. They pad and build masks; they never draw noise (that is the model's job).

Dataset items (see datamodule.py):
- pretrain: ``{"tokens": (L+1,) long, "doc_ids": (L+1,) long}``, a packed row with one token of look-ahead;
- sft: ``{"tokens": (n,) long, "loss_mask": (n,) bool}``, one rendered conversation (n <= L).

Both paradigms see the same rows: AR trains on ``tokens[:-1] -> tokens[1:]``, diffusion denoises ``tokens[:L]``.
Padding carries document id -1, so attention never reaches it (see ``model.document_attention_mask``); the flags
``needs_doc_mask`` / ``needs_pad_mask`` tell the model on the host whether a mask is needed at all.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def with_mask_flags(batch: dict[str, torch.Tensor]) -> dict:
    """Add host-side flags: does any row hold several documents or padding? (Then attention needs a mask.)"""
    doc_ids = batch["doc_ids"]
    batch["needs_pad_mask"] = bool((doc_ids < 0).any())
    batch["needs_doc_mask"] = bool((doc_ids != doc_ids[:, :1]).any())
    return batch


def _pad(seqs: list[torch.Tensor], length: int, value) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s[:length]
    return out


class ARCollate:
    """Batch for next-token prediction.

    Returns ``input_ids`` (B, T), ``targets`` (B, T) with -100 where no loss is taken, ``doc_ids`` (B, T).
    Pretrain: every target counts. SFT: only targets under the loss mask (assistant content + ``<|im_end|>``);
    rows are right-padded with ``pad_id`` to the longest row.
    """

    def __init__(self, kind: str, pad_id: int, eos_id: int, max_len: int | None = None):
        self.kind, self.pad_id = kind, pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if self.kind == "pretrain":
            tokens = torch.stack([it["tokens"] for it in items])
            docs = torch.stack([it["doc_ids"] for it in items])
            return with_mask_flags({"input_ids": tokens[:, :-1], "targets": tokens[:, 1:].clone(),
                                    "doc_ids": docs[:, :-1]})
        T = max(len(it["tokens"]) for it in items) - 1
        tokens = _pad([it["tokens"] for it in items], T + 1, self.pad_id)
        mask = _pad([it["loss_mask"] for it in items], T + 1, False)
        real = _pad([torch.ones(len(it["tokens"]), dtype=torch.long) for it in items], T + 1, 0)
        targets = tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
        return with_mask_flags({"input_ids": tokens[:, :-1], "targets": targets, "doc_ids": real[:, :-1] - 1})


class DiffusionCollate:
    """Batch for masked diffusion.

    Returns ``input_ids`` (B, T) clean tokens, ``eligible`` (B, T) bool positions that may be masked, ``doc_ids``.
    Pretrain: all real tokens are eligible. SFT (LLaDA): the prompt is never eligible; the response (assistant
    content + ``<|im_end|>``) and the trailing ``eos`` padding are, so the model learns where answers stop. Rows
    are padded with eos to one past the longest row (capped at the longest possible row), so every untruncated
    answer is followed by at least one eos.
    """

    def __init__(self, kind: str, pad_id: int, eos_id: int, max_len: int | None = None):
        self.kind, self.eos_id, self.max_len = kind, eos_id, max_len

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if self.kind == "pretrain":
            tokens = torch.stack([it["tokens"][:-1] for it in items])
            docs = torch.stack([it["doc_ids"][:-1] for it in items])
            return with_mask_flags({"input_ids": tokens, "eligible": torch.ones_like(tokens, dtype=torch.bool),
                                    "doc_ids": docs})
        T = max(len(it["tokens"]) for it in items) + 1
        if self.max_len is not None:
            T = min(T, self.max_len)
        tokens = _pad([it["tokens"] for it in items], T, self.eos_id)
        mask = _pad([it["loss_mask"] for it in items], T, True)  # eos padding is part of the answer
        return with_mask_flags({"input_ids": tokens, "eligible": mask, "doc_ids": torch.zeros_like(tokens)})
