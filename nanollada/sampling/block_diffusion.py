"""Block-diffusion decoding (LLaDA 2.0 / dInfer): blocks left to right, each denoised in parallel, with an exact
KV cache of the finished blocks.

The canvas is ``prompt + masks`` rounded up to whole blocks of ``block_size`` at absolute positions; decoding starts
at block ``P // block_size``, so the prompt's last partial block is decoded in place with its prompt tokens fixed
(HF ``LLaDA2.0 generate``). The model attends block-causally (``model.block_causal_mask``): a position sees every
position of its own and of earlier blocks, never a later block -- exactly what it saw in training, where a noisy
block sees itself and the clean earlier blocks. Each step runs the model, proposes x0 = argmax of the (Gumbel-noised)
logits at the masked positions of the current block, and a ``Strategy`` from ``sampling.diffusion`` commits some of
them (default: Fast-dLLM / LLaDA 2.0 threshold 0.95, at least one per step). A committed eos with nothing masked
before it ends the row's answer (the rest becomes eos); generation stops once every row has ended.

**The cache is exact at any depth.** Keys and values of a position depend only on its own and earlier blocks, so
once a block is finished its keys/values never change. With ``use_cache`` each forward feeds only the blocks not yet
cached -- the block that just finished (its final keys/values are written now, in the same forward) and the current
block -- at ``cache_pos`` = the first uncached position, attending to the cache. The first forward feeds the whole
prompt (its full blocks are the prefill). So cached decoding gives the same logits as recomputing the canvas (to
float rounding) and costs no extra forward per block: forwards = denoising steps. (dInfer spends one extra forward
per block to write the finished block; merging it into the next block's first step is the same computation.)

Shapes: B batch, P prompt length, N canvas length (a multiple of the block size), V vocab.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from nanollada.model import KVCache, block_causal_mask
from nanollada.sampling.diffusion import (DiffusionOutput, Strategy, _finish_rows, add_gumbel_noise, ban_early_stops,
                                          defer_stops, guided_forward)


def canvas_length(prompt_len: int, max_new_tokens: int, block_size: int, max_seq_len: int) -> int:
    """Generated positions G so that P + G ends on a block boundary, G >= max_new_tokens where max_seq_len allows
    (else the most whole blocks that fit); ValueError when not even the prompt's own block fits."""
    end = -(-(prompt_len + max_new_tokens) // block_size) * block_size
    end = min(end, (max_seq_len // block_size) * block_size)
    if end <= prompt_len:
        raise ValueError(f"no room for a block of {block_size} after a {prompt_len}-token prompt "
                         f"(max_seq_len={max_seq_len})")
    return end - prompt_len


@torch.inference_mode()
def block_diffusion_generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    *,
    gen_length: int,
    block_size: int,
    strategy: Strategy,
    mask_id: int,
    eos_id: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    record_trace: bool = False,
    on_step=None,
    logits_log: list | None = None,
    edit_threshold: float | None = None,
    max_post_edit_steps: int = 16,
    edit_penalty: float = 0.0,
    cfg_scale: float = 0.0,
    end_ids: tuple[int, ...] = (),
    min_new_tokens: int = 0,
    eos_after_text: bool = False,
) -> DiffusionOutput:
    """Fill ``gen_length`` masks after prompt_ids (B, P) long (equal-length prompts), block by block.

    ``P + gen_length`` must be a multiple of ``block_size`` (``canvas_length`` computes it). ``use_cache`` feeds only
    uncached blocks (exact, see the module docstring); False recomputes the canvas up to the current block each step.
    ``on_step(generated (B, G))`` after each step may return True to stop; ``logits_log``, a list, receives every
    step's logits of the current block (B, block_size, V) on the CPU (tests compare cached and uncached decoding).

    Token editing (LLaDA 2.1, ``edit_threshold`` not None): in the same step as the commits, every committed
    non-prompt position of the current block whose argmax v differs from its token and has p(v) > edit_threshold
    is rewritten to v (T2T; the strategy's commits are M2T). Once the block has no masks, edit-only steps continue
    until a step changes nothing (so the last commits are checked at least once) or ``max_post_edit_steps`` have
    run (HF LLaDA2.1 ``generate``). ``edit_penalty`` subtracts that much from the
    logit of the previous position's token (SGLang ``penalty_lambda``). Finished blocks are never edited, so the
    cache stays exact. ``edits`` in the output counts the rewritten tokens.

    ``cfg_scale`` > 0: classifier-free guidance (``sampling.diffusion.guided_forward``): the prompt-masked canvas
    runs in the same batch (and the same, doubled, cache). ``end_ids``, ``min_new_tokens``, ``eos_after_text``: as
    in ``sampling.diffusion.diffusion_generate``.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be (B, P) with P >= 1, got shape {tuple(prompt_ids.shape)}")
    (B, P), device = prompt_ids.shape, prompt_ids.device
    N = P + gen_length
    if gen_length < 1 or block_size < 1 or N % block_size:
        raise ValueError(f"prompt {P} + gen_length {gen_length} must be a positive multiple of block_size "
                         f"{block_size}")
    x = torch.cat([prompt_ids, prompt_ids.new_full((B, gen_length), mask_id)], dim=1)
    causal = block_causal_mask(N, block_size, device)
    cache = (KVCache(model.cfg, B * (2 if cfg_scale else 1), N, device=device, dtype=next(model.parameters()).dtype)
             if use_cache else None)
    written = 0  # the cache holds the final keys/values of positions [0, written)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first, n_blocks = P // block_size, N // block_size
    forwards = forward_tokens = committed = edits = 0
    steps_per_block, trace, first_round, stopped = [], [], None, False
    stops = tuple(t for t in (eos_id, *end_ids) if t is not None)
    start = time.perf_counter()
    for k in range(first, n_blocks):
        if stopped:
            break
        s, e = k * block_size, (k + 1) * block_size
        allowance = None
        if strategy.budget is not None:  # the forwards left, shared evenly by the blocks left
            allowance = max(1, -(-(strategy.budget - forwards) // (n_blocks - k)))
        # a block that starts with masks gets edit-only steps after its last commit; one already full is left alone
        step, post, edited = 0, 0, bool((x[:, s:e] == mask_id).any())
        fixed = torch.arange(s, e, device=device)[None] < P  # prompt positions of the block: never edited
        while (masked := x[:, s:e] == mask_id).any() or (edit_threshold is not None and edited
                                                          and post < max_post_edit_steps):
            if not masked.any():
                post += 1
            if cache is not None:
                logits = guided_forward(model, x[:, written:e], written, P, mask_id, cfg_scale,
                                        attn_mask=causal[None, None, written:e, :e], kv_cache=cache,
                                        cache_pos=written)[:, s - written:]
                forward_tokens += B * (e - written)
                written = s  # [written, s) were finished blocks: their keys/values are final now
            else:
                logits = guided_forward(model, x[:, :e], 0, P, mask_id, cfg_scale,
                                        attn_mask=causal[None, None, :e, :e])[:, s:e]
                forward_tokens += B * e
            forwards += 1
            logits = logits.float()
            logits[..., mask_id] = -torch.inf  # never propose the mask token itself
            ban_early_stops(logits, s, P, stops, min_new_tokens)
            if edit_penalty:
                prev = x[:, s - 1:e - 1] if s > 0 else torch.cat([x[:, :1], x[:, s:e - 1]], 1)
                logits.scatter_add_(-1, prev[..., None], torch.full(prev[..., None].shape, -edit_penalty,
                                                                     device=device))
            if logits_log is not None:
                logits_log.append(logits.cpu())
            x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)  # (B, block)
            p_x0 = F.softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            confidence = torch.where(masked, strategy.score(p_x0, generator), -torch.inf)
            if eos_after_text:
                confidence = defer_stops(x0, confidence, x[:, P:], s, P, mask_id, stops)
            steps_left = strategy.steps - step if strategy.steps else (None if allowance is None else allowance - step)
            if masked.any():
                commit = strategy.commit(confidence, masked.sum(1), step, steps_left) & masked
                if not commit.any():
                    raise RuntimeError(f"{type(strategy).__name__} committed nothing at step {step} of block {k}")
            else:
                commit = torch.zeros_like(masked)
            edit = torch.zeros_like(masked)
            if edit_threshold is not None:
                edit = ~masked & ~fixed & (x0 != x[:, s:e]) & (p_x0 > edit_threshold)
                edits += int(edit.sum())
            edited = bool(edit.any() or commit.any())  # new tokens: check them once more
            x[:, s:e] = torch.where(commit | edit, x0, x[:, s:e])
            committed += int(commit.sum())
            if eos_id is not None:
                _finish_rows(x[:, P:], mask_id, eos_id, end_ids)
            step += 1
            if first_round is None:
                sync()
                first_round = time.perf_counter() - start
            if record_trace:
                trace.append(x[:, P:].clone().cpu())
            if on_step is not None and on_step(x[:, P:]):
                stopped = True
                break
        steps_per_block.append(step)
    sync()
    return DiffusionOutput(tokens=x, generated=x[:, P:], forwards=forwards, steps_per_block=steps_per_block,
                           forward_tokens=forward_tokens, committed=committed, first_round_seconds=first_round or 0.0,
                           seconds=time.perf_counter() - start, trace=trace, stopped_early=stopped, edits=edits)
