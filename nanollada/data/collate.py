"""Paradigm-specific collate functions. They pad and build masks; they never draw noise (that is the model's job).

Dataset items (see datamodule.py):
- pretrain: ``{"tokens": (L+1,) long, "doc_ids": (L+1,) long}``, a packed row with one token of look-ahead;
- sft: ``{"tokens": (n,) long, "loss_mask": (n,) bool}``, one rendered conversation (n <= L);
- preference: ``{"chosen": <sft-like item>, "rejected": <sft-like item>}``, one pair, the loss mask on the response
  only (``preference.py``). Both paradigm families batch its chosen rows first, then its rejected rows (row i and
  row B + i are a pair; ``batch["pairs"]`` = B), with the loss (AR targets, diffusion eligible positions) on the
  responses only.

Both paradigms see the same rows: AR trains on ``tokens[:-1] -> tokens[1:]``, diffusion denoises ``tokens[:L]``.
SFT differs in one way: diffusion splits a conversation into one row per assistant turn (``answer_turns``), AR keeps
the conversation as one row; both read the same cached conversations, so the records (and the validation split) are
the same.
Padding carries document id -1, so attention never reaches it (see ``model.document_attention_mask``); the flags
``needs_doc_mask`` / ``needs_pad_mask`` tell the model on the host whether a mask is needed at all.
"""

from __future__ import annotations

import torch

from nanollada.data.preference import preference_rows

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


def answer_turns(loss_mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of every assistant answer of a rendered conversation: the maximal runs of True in its loss
    mask (content + ``<|im_end|>``; the template puts unmasked tokens between any two answers). A conversation
    truncated inside an answer ends with that partial answer."""
    m = torch.cat([torch.zeros(1, dtype=torch.int8), loss_mask.to(torch.int8), torch.zeros(1, dtype=torch.int8)])
    edges = torch.diff(m)
    return list(zip(torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()))


class ARCollate:
    """Batch for next-token prediction.

    Returns ``input_ids`` (B, T), ``targets`` (B, T) with -100 where no loss is taken, ``doc_ids`` (B, T).
    Pretrain: every target counts. SFT: only targets under the loss mask (assistant content + ``<|im_end|>``);
    rows are right-padded with ``pad_id`` to the longest row. A multi-turn conversation stays one row with every
    assistant turn in the loss: for a causal model this equals LLaDA's split into one row per turn (appendix B),
    since token j only sees tokens < j, i.e. exactly that turn's prompt (all earlier turns) and its own prefix.
    """

    def __init__(self, kind: str, pad_id: int, eos_id: int, max_len: int | None = None):
        self.kind, self.pad_id = kind, pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if self.kind == "preference":  # 2B rows, targets on the responses; padding is pad with doc id -1
            return {**ARCollate("sft", self.pad_id, 0)(preference_rows(items)), "pairs": len(items)}
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

    Returns ``input_ids`` (R, T) clean tokens, ``eligible`` (R, T) bool positions that may be masked, ``doc_ids``.
    Pretrain: all real tokens are eligible (R = B). SFT (LLaDA, eq. 5 and appendix B): a conversation with n
    assistant turns becomes n single-turn rows, so R >= B (R = the batch's number of answers). Row k is the
    conversation up to the end of answer k: every earlier turn (earlier answers included) is the prompt and is never
    eligible; answer k (content + ``<|im_end|>``) and the ``eos`` padding after it are eligible, so the model learns
    where answers stop. Every position after the prompt is eligible, as at inference, where everything after the
    prompt is masked (the template's ``"\\n"`` after ``<|im_end|>`` is not part of the row). Rows are padded with eos
    to one past the longest row (capped at ``max_len``), so every untruncated answer is followed by at least one
    eos. A conversation truncated before its first answer gives one row with nothing eligible (zero loss).
    """

    def __init__(self, kind: str, pad_id: int, eos_id: int, max_len: int | None = None):
        self.kind, self.eos_id, self.max_len = kind, eos_id, max_len

    def preference(self, items: list[dict]) -> dict:
        """Preference pairs: 2B rows (chosen, then rejected), eligible = the response only (content +
        ``<|im_end|>``, as LLaDA's conditional likelihood scores an answer of known length), right-padded with eos
        that is neither eligible nor attended (document id -1)."""
        rows = preference_rows(items)
        T = max(len(r["tokens"]) for r in rows)
        tokens = _pad([r["tokens"] for r in rows], T, self.eos_id)
        eligible = _pad([r["loss_mask"] for r in rows], T, False)
        real = _pad([torch.ones(len(r["tokens"]), dtype=torch.long) for r in rows], T, 0)
        return {**with_mask_flags({"input_ids": tokens, "eligible": eligible, "doc_ids": real - 1}),
                "pairs": len(items)}

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if self.kind == "preference":
            return self.preference(items)
        if self.kind == "pretrain":
            tokens = torch.stack([it["tokens"][:-1] for it in items])
            docs = torch.stack([it["doc_ids"][:-1] for it in items])
            return with_mask_flags({"input_ids": tokens, "eligible": torch.ones_like(tokens, dtype=torch.bool),
                                    "doc_ids": docs})
        rows, prompts = [], []  # one (conversation up to the answer's end, prompt length) per answer turn
        for it in items:
            turns = answer_turns(it["loss_mask"]) or [(len(it["tokens"]),) * 2]
            for start, end in turns:
                rows.append(it["tokens"][:end])
                prompts.append(start)
        T = max(len(r) for r in rows) + 1
        if self.max_len is not None:
            T = min(T, self.max_len)
        tokens = _pad(rows, T, self.eos_id)
        eligible = torch.arange(T)[None, :] >= torch.tensor(prompts)[:, None]  # the answer and its eos padding
        eligible &= torch.tensor([s < len(r) for s, r in zip(prompts, rows)])[:, None]  # no answer: nothing
        return with_mask_flags({"input_ids": tokens, "eligible": eligible, "doc_ids": torch.zeros_like(tokens)})
