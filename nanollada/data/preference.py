"""Preference pairs (MiniMind's ``dpo.jsonl``): rendering, truncation and the dataset of the ``preference`` kind.

A record ``{"chosen": [messages], "rejected": [messages]}`` holds two conversations that share every message but the
last assistant turn (``records.check_preference``). The *prompt* is that shared prefix rendered with the chat template
plus the open ``<|im_start|>assistant\\n`` header, exactly as SFT renders it (Nano-LLaDA's DPO dataset renders a
literal ``"\\\\n"`` instead, so its DPO template differs from its SFT one -- a bug not copied here); each *response* is
the last assistant turn's content plus ``<|im_end|>``, the tokens SFT trains on. The template's ``"\\n"`` after
``<|im_end|>`` is not part of the response.

Pairs longer than ``max_len`` are cut so the prompt stays shared (:func:`truncate_pair`). The token cache stores a
pair as two consecutive documents (chosen, then rejected) with the response as their loss mask, so both halves of a
pair always fall into the same split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from nanollada.data.records import check_preference


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int],
                  max_len: int | None) -> tuple[list[int], list[int], list[int], bool]:
    """Cut a pair to ``max_len`` tokens per sequence (prompt + response), the prompt the same for both.

    When the longer response does not fit after the prompt, the prompt keeps its first token (bos) and its last
    tokens (the latest turn and the assistant header), at most ``max(max_len // 2, max_len - longest response)``
    tokens in all, and each response keeps its first ``max_len - prompt`` tokens (TRL's ``keep_end`` for the prompt).
    Returns (prompt, chosen, rejected, truncated)."""
    longest = max(len(chosen), len(rejected))
    if max_len is None or len(prompt) + longest <= max_len:
        return prompt, chosen, rejected, False
    if max_len < 4:
        raise ValueError(f"max_len={max_len} leaves no room for a prompt and an answer")
    keep = min(len(prompt), max(max_len // 2, max_len - longest))
    prompt = prompt[:1] + prompt[len(prompt) - (keep - 1):]
    room = max_len - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


def render_preference(tokenizer, record: dict, max_len: int | None = None
                      ) -> tuple[list[int], list[int], list[int], bool]:
    """Token ids of a preference record: (prompt, chosen response, rejected response, truncated).

    ``prompt + response`` is exactly the chat-template rendering of that conversation without its final ``"\\n"``."""
    prompt_msgs, chosen, rejected = check_preference(record)
    prompt = tokenizer.render_chat(prompt_msgs, add_generation_prompt=True)[0]
    answer = [tokenizer.encode(m["content"]) + [tokenizer.im_end_id] for m in (chosen, rejected)]
    return truncate_pair(prompt, answer[0], answer[1], max_len)


def preference_documents(tokenizer, record: dict, max_len: int | None = None
                         ) -> tuple[list[tuple[list[int], list[bool]]], bool]:
    """The two cache documents of a pair, [(ids, response mask) of chosen, of rejected], and whether it was cut."""
    prompt, chosen, rejected, cut = render_preference(tokenizer, record, max_len)
    return [(prompt + r, [False] * len(prompt) + [True] * len(r)) for r in (chosen, rejected)], cut


class PreferencePairs(Dataset):
    """One pair per item: ``{"chosen": {"tokens", "loss_mask"}, "rejected": {...}}`` (each like an SFT item, the loss
    mask on the response only), read from a ``preference`` token cache (documents 2i and 2i + 1)."""

    def __init__(self, cache):
        self.cache = cache

    def __len__(self) -> int:
        return self.cache.n_docs // 2

    def _doc(self, d: int) -> dict[str, torch.Tensor]:
        a, b = int(self.cache.offsets[d]), int(self.cache.offsets[d + 1])
        return {"tokens": torch.from_numpy(np.asarray(self.cache.tokens[a:b], dtype=np.int64)),
                "loss_mask": torch.from_numpy(np.asarray(self.cache.mask[a:b], dtype=np.bool_))}

    def __getitem__(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        return {"chosen": self._doc(2 * i), "rejected": self._doc(2 * i + 1)}


def preference_rows(items: list[dict]) -> list[dict]:
    """The rows of a batch of pairs: every chosen response, then every rejected one (row i and row B + i pair up)."""
    return [it["chosen"] for it in items] + [it["rejected"] for it in items]
