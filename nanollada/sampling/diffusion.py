"""Masked-diffusion (LLaDA-style) generation: iterative unmasking with pluggable commit strategies.

The canvas is ``prompt + gen_length`` mask tokens. It is filled in semi-autoregressive blocks of ``block_length``
(LLaDA ``generate.py``): while the current block has masked positions, one step runs the model, draws a candidate x0
for every masked position of the block (argmax of Gumbel-noised logits), scores it (softmax probability of x0, or a
random number) and lets a :class:`Strategy` choose which positions to commit; later blocks stay masked meanwhile.
Strategies: LLaDA ``low_confidence`` / ``random`` remasking with a fixed number of steps, the Fast-dLLM confidence
threshold, and the v0.1.0 report's "confidence threshold + top-k + decode budget".

Shapes: B batch, P prompt length, G gen_length, L block_length, V vocab.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from nanollada.model import KVCache


def add_gumbel_noise(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gumbel-max perturbation from LLaDA ``generate.py``: argmax of the result samples softmax(logits / temperature).

    exp(l) / (-log u)^T has the argmax of l / T + Gumbel noise; float64 because low-precision Gumbel noise hurts
    sample quality (LLaDA's note). logits (..., V); temperature 0 returns logits unchanged (greedy argmax).
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(u)) ** temperature


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: mask_index bool (B, L) -> (B, steps) long, each row's masked count split evenly with the
    remainder going to the first steps. Equal step by step to ``ceil(n_masked_left / steps_left)``."""
    n = mask_index.sum(dim=1, keepdim=True)
    return n // steps + (torch.arange(steps, device=n.device)[None] < n % steps).long()


def _top_k(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """bool (B, L): the k[b] (B,) most confident finite entries of each row; ties go to the earlier position."""
    order = confidence.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(confidence.shape[1], device=confidence.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    return (rank < k[:, None]) & torch.isfinite(confidence)


STRATEGIES: dict[str, type["Strategy"]] = {}


def register_strategy(name: str):
    """Class decorator: make a :class:`Strategy` available under ``name`` (``--strategy name``)."""
    def deco(cls):
        cls.name = name
        STRATEGIES[name] = cls
        return cls
    return deco


def build_strategy(name: str, settings, block_length: int) -> "Strategy":
    """The registered strategy ``name`` built from a ``GenerationSettings`` (its ``from_settings``)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown diffusion strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name].from_settings(settings, block_length)


class Strategy:
    """Chooses which masked positions of the current block to commit at each step.

    ``steps``: a fixed number of forwards per block (LLaDA schedules), or None for adaptive strategies.
    ``budget``: a cap on the forwards of a whole generation, or None. The generator turns either into ``steps_left``.
    Subclasses are registered by name with :func:`register_strategy` and built from settings by ``from_settings``.
    """

    name: str = "base"
    steps: int | None = None
    budget: int | None = None

    @classmethod
    def from_settings(cls, settings, block_length: int) -> "Strategy":
        """This strategy from a ``GenerationSettings`` and the block length in use."""
        raise NotImplementedError

    def score(self, p_x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Confidence (B, L) of the candidates from their probabilities p_x0 (B, L); LLaDA ``low_confidence``."""
        return p_x0

    def commit(
        self, confidence: torch.Tensor, n_masked: torch.Tensor, step: int, steps_left: int | None
    ) -> torch.Tensor:
        """confidence (B, L) float, -inf where not masked; n_masked (B,) long; step: index within the block;
        steps_left: forwards this block may still use, this one included (None = unbounded) -> bool (B, L) commit."""
        raise NotImplementedError


@register_strategy("low_confidence")
class LowConfidence(Strategy):
    """LLaDA ``low_confidence`` remasking: ``steps`` forwards per block, each committing the k most confident
    candidates with k from :func:`get_num_transfer_tokens` (``steps`` is per block, not LLaDA's total). With more
    steps than masked positions the steps that would commit nothing are skipped, not run."""

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps

    @classmethod
    def from_settings(cls, settings, block_length):
        return cls(settings.steps or block_length)

    def commit(self, confidence, n_masked, step, steps_left):
        return _top_k(confidence, -(-n_masked // steps_left))  # ceil: the even split, remainder first


@register_strategy("random")
class RandomRemask(LowConfidence):
    """LLaDA ``random`` remasking: the same schedule as :class:`LowConfidence` with uniform random confidence."""

    def score(self, p_x0, generator=None):
        return torch.rand(p_x0.shape, device=p_x0.device, generator=generator)


@register_strategy("threshold")
class ConfidenceThreshold(Strategy):
    """Fast-dLLM parallel decoding: commit every candidate with probability > threshold, and always the most
    confident one so each step makes progress."""

    def __init__(self, threshold: float = 0.9):
        self.threshold = threshold

    @classmethod
    def from_settings(cls, settings, block_length):
        return cls(settings.threshold)

    def commit(self, confidence, n_masked, step, steps_left):
        return (confidence > self.threshold) | _top_k(confidence, torch.ones_like(n_masked))


@register_strategy("threshold_topk")
class ThresholdTopKBudget(Strategy):
    """v0.1.0 report: commit candidates above ``threshold``, at most ``top_k`` and at least one per step; ``budget``
    caps the forwards of a whole generation (split over the blocks left), and once the steps left would not suffice
    each step commits ceil(n_masked / steps_left), overriding ``top_k``."""

    def __init__(self, threshold: float = 0.9, top_k: int = 4, budget: int | None = None):
        if top_k < 1 or (budget is not None and budget < 1):
            raise ValueError(f"top_k and budget must be >= 1, got top_k={top_k}, budget={budget}")
        self.threshold, self.top_k, self.budget = threshold, top_k, budget

    @classmethod
    def from_settings(cls, settings, block_length):
        return cls(settings.threshold, settings.commit_top_k, settings.budget)

    def commit(self, confidence, n_masked, step, steps_left):
        k = (confidence > self.threshold).sum(1).clamp(1, self.top_k)
        if steps_left is not None:
            k = torch.maximum(k, -(-n_masked // steps_left))
        return _top_k(confidence, k)


@dataclass
class DiffusionOutput:
    """Result of :func:`diffusion_generate`; ``trace`` holds the generated region (B, G) after every step."""

    tokens: torch.Tensor  # (B, P + G) prompt + generation
    generated: torch.Tensor  # (B, G)
    forwards: int  # model calls
    steps_per_block: list[int]  # model calls spent on each block (0 for blocks skipped after eos)
    forward_tokens: int  # token positions fed to the model, summed over calls and rows (a FLOPs proxy)
    committed: int  # positions committed by the strategy (eos padding excluded), summed over rows
    first_round_seconds: float  # wall time of the first forward + commit round
    seconds: float  # wall time of the whole generation
    trace: list[torch.Tensor] = field(default_factory=list)
    stopped_early: bool = False  # an ``on_step`` callback asked to stop
    edits: int = 0  # committed tokens rewritten by token editing (block diffusion, LLaDA 2.1)

    @property
    def tokens_per_forward(self) -> float:
        return self.committed / max(1, self.forwards * self.generated.shape[0])


def guided_forward(model, x: torch.Tensor, start: int, prompt_len: int, mask_id: int, cfg_scale: float,
                   attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Logits (B, T, V) of ``model`` on the canvas slice x (B, T) that begins at absolute position ``start``, with
    classifier-free guidance (LLaDA ``generate.py``) when ``cfg_scale`` > 0: the unconditional rows are the same
    slice with every prompt position (< ``prompt_len``) replaced by the mask token, batched with the conditional
    rows into one forward (attention masks with a batch dimension are repeated, a KV cache must have 2B rows), and
    the logits are ``un + (cfg_scale + 1) * (cond - un)``. cfg_scale 0 is one plain forward."""
    if not cfg_scale:
        return model(x, attn_mask=attn_mask, **kwargs)
    un = x.clone()
    un[:, : max(0, prompt_len - start)] = mask_id
    if attn_mask is not None and attn_mask.shape[0] > 1:
        attn_mask = attn_mask.repeat(2, *([1] * (attn_mask.dim() - 1)))
    cond, unc = model(torch.cat([x, un]), attn_mask=attn_mask, **kwargs).float().chunk(2)
    return unc + (cfg_scale + 1) * (cond - unc)


def _finish_rows(gen: torch.Tensor, mask_id: int, eos_id: int, end_ids: tuple[int, ...] = ()) -> None:
    """In place on gen (B, G): a row whose first stop token (eos, or one of ``end_ids`` such as ``<|im_end|>``) has
    no mask before it is finished; everything after that token becomes eos (LLaDA's SFT answers end with
    ``<|im_end|>`` and are padded with eos, so either ends the answer)."""
    eos = gen == eos_id
    for t in end_ids:
        eos = eos | (gen == t)
    after = eos.cumsum(1) > 0  # at or after the first stop
    done = eos.any(1) & ~((gen == mask_id) & ~after).any(1)
    gen.masked_fill_(done[:, None] & after, eos_id)


def defer_stops(x0: torch.Tensor, confidence: torch.Tensor, generated: torch.Tensor, start: int, prompt_len: int,
                mask_id: int, stops: tuple[int, ...]) -> torch.Tensor:
    """LLaDA's ``confidence_eos_eot_inf`` (its ``generate.py``), for the block [start, start + L) of the canvas: a
    stop candidate (x0 (B, L) in ``stops``) with a masked answer position before it gets a confidence below every
    probability -- finite, so a step whose only candidates are stops still commits one. eos and ``<|im_end|>`` are
    then committed after the text they end. generated: the answer region (B, G), masks included. Returns (B, L)."""
    if stops:
        is_stop = torch.zeros_like(x0, dtype=torch.bool)
        for t in stops:
            is_stop |= x0 == t
        m = (generated == mask_id).long()
        before = (m.cumsum(1) - m) > 0  # (B, G): some earlier answer position is masked
        a = start - prompt_len
        lo = max(a, 0)
        block_before = torch.zeros_like(is_stop)
        block_before[:, lo - a:] = before[:, lo:a + x0.shape[1]]
        confidence = torch.where(is_stop & block_before & torch.isfinite(confidence), confidence - 2.0, confidence)
    return confidence


def ban_early_stops(logits: torch.Tensor, start: int, prompt_len: int, stops: tuple[int, ...],
                    min_new_tokens: int) -> None:
    """In place: stop tokens cannot be proposed at answer positions < ``min_new_tokens`` (logits (B, L, V) of the
    block starting at canvas position ``start``)."""
    if not min_new_tokens or not stops:
        return
    pos = torch.arange(start, start + logits.shape[1], device=logits.device) - prompt_len
    early = (pos >= 0) & (pos < min_new_tokens)
    for t in stops:
        logits[:, early, t] = -torch.inf


@torch.inference_mode()
def diffusion_generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    *,
    gen_length: int,
    block_length: int,
    strategy: Strategy,
    mask_id: int,
    eos_id: int | None = None,
    temperature: float = 0.0,
    prompt_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    use_prefix_cache: bool = False,
    attend_future_blocks: bool | None = None,
    record_trace: bool = False,
    on_step: Callable[[torch.Tensor], bool | None] | None = None,
    cfg_scale: float = 0.0,
    end_ids: tuple[int, ...] = (),
    min_new_tokens: int = 0,
    eos_after_text: bool = False,
) -> DiffusionOutput:
    """Fill gen_length masks after prompt_ids (B, P) long, block by block, as LLaDA ``generate.py`` does.

    prompt_mask: optional bool (B, P), False marks (left) padding that no position may attend to.
    attend_future_blocks: True (default without cache, as LLaDA) runs the model on the whole canvas; False runs it
        only on the canvas up to the end of the current block, the later masked blocks being dropped.
    use_prefix_cache: Fast-dLLM prefix cache. It drops the later masked blocks from attention
        (attend_future_blocks=False), which alone changes ~1.5% of tokens against LLaDA's full canvas on a trained
        small model (``benchmarks/cache_agreement.py``), and then caches the prefix. The first step of a block runs the
        model on [0, block_end) and stores its keys/values, so the finished blocks' keys are recomputed from their
        committed tokens at every block start; later steps feed only the block at ``cache_pos=block_start`` and
        reuse the prefix keys. Exact for one layer; with more layers an approximation, since the prefix's deeper keys
        are frozen at the block-start state of the block instead of following its refinement.
    eos_id: once every row has a committed eos with nothing masked before it, generation stops; positions after a
        row's first eos are eos. Reproducible given ``generator`` (Gumbel noise, random remasking).
    on_step: called after every step with the generated region (B, G) (masks included); a true return value stops
        generation at once (a streaming client went away). ``stopped_early`` then says so.
    cfg_scale: classifier-free guidance weight w (``guided_forward``; 0 = off): each forward also runs the canvas
        with the prompt masked, in the same batch, and mixes the logits ``un + (w + 1) (cond - un)``.
    end_ids: further stop tokens beside eos (``<|im_end|>`` for chat answers): they end a row like eos does.
    min_new_tokens / eos_after_text: LLaDA's remedies against answers that end at once (``ban_early_stops``,
        ``defer_stops``): no stop token in the first ``min_new_tokens`` answer positions; stop tokens committed
        only after every earlier answer position.
    """
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be (B, P), got shape {tuple(prompt_ids.shape)}")
    if gen_length < 1 or block_length < 1 or gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a positive multiple of block_length={block_length}")
    if use_prefix_cache and attend_future_blocks:
        raise ValueError("use_prefix_cache drops the later blocks from attention; it needs attend_future_blocks=False")
    attend_future = not use_prefix_cache if attend_future_blocks is None else attend_future_blocks
    n_blocks = gen_length // block_length
    if strategy.budget is not None and strategy.budget < n_blocks:
        raise ValueError(f"decode budget {strategy.budget} is below the number of blocks {n_blocks}")
    (B, P), device = prompt_ids.shape, prompt_ids.device
    x = torch.cat([prompt_ids, prompt_ids.new_full((B, gen_length), mask_id)], dim=1)
    keys_ok = None  # (B, 1, 1, S): key-padding mask broadcast over heads and queries
    if prompt_mask is not None:
        gen_ok = torch.ones(B, gen_length, dtype=torch.bool, device=device)
        keys_ok = torch.cat([prompt_mask.bool(), gen_ok], 1)[:, None, None]
    cache = None
    if use_prefix_cache:
        cache = KVCache(model.cfg, B * (2 if cfg_scale else 1), x.shape[1], device=device,
                        dtype=next(model.parameters()).dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    forwards = forward_tokens = committed = 0
    steps_per_block, trace, first_round = [], [], None
    stops = tuple(t for t in (eos_id, *end_ids) if t is not None)
    start = time.perf_counter()
    stopped_early = False
    for b in range(n_blocks):
        if stopped_early:
            break
        s, e = P + b * block_length, P + (b + 1) * block_length
        allowance = None
        if strategy.budget is not None:  # fair share of what is left; ceil keeps >= 1 forward for each later block
            allowance = -(-(strategy.budget - forwards) // (n_blocks - b))
        step = 0
        while (masked := x[:, s:e] == mask_id).any():
            if cache is not None:
                inp, pos = (x[:, :e], 0) if step == 0 else (x[:, s:e], s)
                logits = guided_forward(model, inp, pos, P, mask_id, cfg_scale,
                                        attn_mask=None if keys_ok is None else keys_ok[..., :e], kv_cache=cache,
                                        cache_pos=pos)[:, s - pos:]
            else:
                inp = x if attend_future else x[:, :e]
                mask = None if keys_ok is None else keys_ok[..., : inp.shape[1]]
                logits = guided_forward(model, inp, 0, P, mask_id, cfg_scale, attn_mask=mask)[:, s:e]
            forwards, forward_tokens = forwards + 1, forward_tokens + inp.numel()
            logits[..., mask_id] = -torch.inf  # never propose the mask token itself
            ban_early_stops(logits, s, P, stops, min_new_tokens)
            x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)  # (B, L)
            p_x0 = F.softmax(logits.float(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            confidence = torch.where(masked, strategy.score(p_x0, generator), -torch.inf)
            if eos_after_text:
                confidence = defer_stops(x0, confidence, x[:, P:], s, P, mask_id, stops)
            steps_left = strategy.steps - step if strategy.steps else (None if allowance is None else allowance - step)
            commit = strategy.commit(confidence, masked.sum(1), step, steps_left) & masked
            if not commit.any():
                raise RuntimeError(f"{type(strategy).__name__} committed nothing at step {step} of block {b}")
            x[:, s:e] = torch.where(commit, x0, x[:, s:e])
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
                stopped_early = True
                break
        steps_per_block.append(step)
    sync()
    return DiffusionOutput(tokens=x, generated=x[:, P:], forwards=forwards, steps_per_block=steps_per_block,
                           forward_tokens=forward_tokens, committed=committed, first_round_seconds=first_round or 0.0,
                           seconds=time.perf_counter() - start, trace=trace, stopped_early=stopped_early)


def _cells(canvas: torch.Tensor, decode: Callable[[list[int]], str] | None, mask_id: int) -> list[str | None]:
    """One row (G,) -> per-position text, None for masks; without decode the ids themselves."""
    return [None if t == mask_id else (decode([t]) if decode else str(t)) for t in canvas.tolist()]


def print_trace(trace: list[torch.Tensor], decode: Callable[[list[int]], str] | None = None, *, mask_id: int,
                row: int = 0, file=None) -> None:
    """Print one row of a trace, one line per step, masks as '░'."""
    sep = "" if decode else " "
    for i, canvas in enumerate(trace):
        cells = _cells(canvas[row], decode, mask_id)
        print(f"[{i:3d}] " + sep.join("░" if c is None else c for c in cells), file=file)


def trace_to_html(trace: list[torch.Tensor], path: str, decode: Callable[[list[int]], str] | None = None, *,
                  mask_id: int, row: int = 0, title: str = "diffusion trace") -> None:
    """Write a self-contained HTML page with a step slider (and a play button) over one row of a trace: masks are
    grey blocks, tokens committed at the shown step are highlighted."""
    steps, prev = [], [None] * (trace[0].shape[1] if trace else 0)
    for canvas in trace:
        cells = _cells(canvas[row], decode, mask_id)
        steps.append("".join('<span class="m">&nbsp;</span>' if c is None else
                             f'<span class="{"n" if p is None else "t"}">{html.escape(c)}</span>'
                             for c, p in zip(cells, prev)))
        prev = cells
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:monospace;max-width:60em;margin:2em auto}} #c{{white-space:pre-wrap;line-height:1.8}}
.m{{display:inline-block;width:.8em;background:#bbb;margin:0 1px}} .n{{background:#ffe08a}}</style></head><body>
<h3>{html.escape(title)}</h3><input id="s" type="range" min="0" max="{max(len(steps) - 1, 0)}" value="0">
<button id="p">play</button> step <span id="i">0</span> / {len(steps)}<div id="c"></div><script>
const S={json.dumps(steps)},s=document.getElementById('s'),show=()=>{{
document.getElementById('c').innerHTML=S[s.value]||'';document.getElementById('i').textContent=+s.value+1}};
s.oninput=show;document.getElementById('p').onclick=()=>{{s.value=0;show();const t=setInterval(()=>{{
if(+s.value>=S.length-1)return clearInterval(t);s.value=+s.value+1;show()}},300)}};show();</script></body></html>"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
