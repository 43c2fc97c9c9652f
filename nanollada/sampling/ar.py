"""Autoregressive decoding for a causal ``Transformer``: KV cache, temperature, top-k, top-p, repetition penalty, eos.

Ragged prompts are left-padded into one batch. Padding is hidden by a boolean attention mask (a padded key is never
attended; a padded query attends only to itself, so no attention row is empty). Left-padding shifts the absolute RoPE
positions of a row by its pad count, but RoPE attention scores depend only on the *relative* offset between query and
key, so every real token sees exactly what it would see alone: batched output equals per-prompt output (up to
float rounding). Rows that produce ``eos_id`` stop growing (they are fed ``pad_id`` and their outputs are discarded),
and the loop ends once every row is done.

Shapes: B batch, P padded prompt length, N new tokens, S key length, V vocab.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from nanollada.model import KVCache


@dataclass
class AROutput:
    """Result of :func:`ar_generate`.

    generated: per row, the new tokens (prompt excluded), stopping *before* eos (eos itself is not included).
    forwards: model calls made (prefill included). first_token_seconds / seconds: wall time to the first new token /
    to the end. stopped_at_eos: per row, whether generation ended because the row produced eos.
    """

    generated: list[list[int]]
    forwards: int
    first_token_seconds: float
    seconds: float
    stopped_at_eos: list[bool]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / HF repetition penalty: logits (B, V), seen bool (B, V) -> (B, V) where every seen token's logit is
    divided by ``penalty`` if positive and multiplied by it if negative (so penalty > 1 makes repeats less likely)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row (B, V); the rest become -inf. None or k >= V leaves logits unchanged."""
    if k is None or k >= logits.shape[-1]:
        return logits
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose cumulative probability
    is >= p (always at least the most likely one); the rest become -inf. logits (B, V); None or p >= 1 = off."""
    if p is None or p >= 1.0:
        return logits
    if p <= 0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p  # the set already reached p without this token; the first token is never dropped
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _as_rows(prompt_ids: list[list[int]] | torch.Tensor) -> list[list[int]]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt tensor must be (B, P), got shape {tuple(prompt_ids.shape)}")
        return prompt_ids.tolist()
    rows = [list(map(int, r)) for r in prompt_ids]
    if not rows:
        raise ValueError("no prompts given")
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def ar_generate(
    model,
    prompt_ids: list[list[int]] | torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    use_kv_cache: bool = True,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], bool | None] | None = None,
) -> AROutput:
    """Sample up to ``max_new_tokens`` tokens after each prompt from a causal ``Transformer``.

    Args:
        model: A causal ``nanollada.model.Transformer`` (``model.cfg.causal`` must be True).
        prompt_ids: B prompts as lists of ids (lengths may differ; each needs at least one token), or a (B, P) long
            tensor of B equal-length prompts (no padding inside).
        max_new_tokens: Most tokens to generate per row.
        temperature: Softmax temperature; 0 = greedy argmax (top-k/top-p then have no effect).
        top_k: Keep only the k most likely tokens (None = off).
        top_p: Nucleus sampling mass (None = off).
        repetition_penalty: CTRL/HF penalty over tokens of the prompt and the generation so far (1.0 = off);
            applied first, also under greedy decoding.
        eos_id: Stop a row when it produces this id (not included in ``generated``); None = never stop early.
        pad_id: Id used for left padding and for feeding finished rows.
        use_kv_cache: Incremental decoding with a ``KVCache`` (one new token per forward); False recomputes the full
            sequence each step (same result, for benchmarks).
        generator: Source of randomness for ``torch.multinomial`` (reproducible under a seed).
        on_token: Called after every step with the new tokens (B,) (``pad_id`` for finished rows); a true return
            value stops generation at once (a streaming client went away).

    Order of logit processing: repetition penalty, temperature, top-k, top-p, then sample.
    """
    cfg = model.cfg
    if not cfg.causal:
        raise ValueError("ar_generate needs a causal model (cfg.causal=True)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    rows = _as_rows(prompt_ids)
    lengths = [len(r) for r in rows]
    if min(lengths) < 1:
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    B, P = len(rows), max(lengths)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if max_new_tokens <= 0:
        return AROutput([[] for _ in rows], 0, 0.0, 0.0, [False] * B)
    total = P + max_new_tokens - 1  # the last new token is never fed back
    if total > cfg.max_seq_len:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceed max_seq_len={cfg.max_seq_len}")

    _sync(device)
    start = time.perf_counter()
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
    lens = torch.tensor(lengths, device=device)
    valid = torch.arange(P, device=device)[None] >= (P - lens)[:, None]  # (B, P) real prompt tokens
    ragged = not bool(valid.all())
    # Keys that may be attended, grown by one column per step; finished rows keep feeding (ignored) pad tokens.
    key_valid = torch.ones(B, P + max_new_tokens, dtype=torch.bool, device=device)
    key_valid[:, :P] = valid

    seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.long, device=device).scatter_add_(1, ids, valid.long()) > 0

    def full_mask(T: int) -> torch.Tensor | None:
        """(B, 1, T, T): valid keys plus the diagonal (so padded queries are never empty); causal added by model."""
        if not ragged:
            return None
        return (key_valid[:, None, :T] | torch.eye(T, dtype=torch.bool, device=device)[None])[:, None]

    cache = KVCache(cfg, B, max_len=total, device=device, dtype=dtype) if use_kv_cache else None
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    n_new = torch.zeros(B, dtype=torch.long, device=device)
    forwards, first_token_seconds = 0, 0.0
    seq = ids  # only used without the cache
    for step in range(max_new_tokens):
        if cache is None:
            logits = model(seq, attn_mask=full_mask(seq.shape[1]))[:, -1]
        elif step == 0:
            logits = model(ids, attn_mask=full_mask(P), kv_cache=cache, cache_pos=0)[:, -1]
        else:
            S = P + step
            mask = key_valid[:, None, None, :S] if ragged else None  # (B, 1, 1, S)
            logits = model(nxt[:, None], attn_mask=mask, kv_cache=cache, cache_pos=S - 1)[:, 0]
        forwards += 1
        logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
            probs = logits.softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        hit_eos = ~done & (nxt == eos_id) if eos_id is not None else torch.zeros_like(done)
        stopped |= hit_eos
        done |= hit_eos
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, step] = nxt
        n_new += (~done).long()
        if repetition_penalty != 1.0:
            seen[torch.arange(B, device=device)[~done], nxt[~done]] = True
        if step == 0:
            _sync(device)
            first_token_seconds = time.perf_counter() - start
        if bool(done.all()):
            break
        if on_token is not None and on_token(nxt):
            break
        if cache is None:
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    _sync(device)
    seconds = time.perf_counter() - start
    generated = [out[b, : int(n_new[b])].tolist() for b in range(B)]
    return AROutput(generated, forwards, first_token_seconds, seconds, stopped.tolist())
