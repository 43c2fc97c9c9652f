"""Text in, text out, for either paradigm: the front end that ``predict`` and ``compare`` share.

``GenerationSettings`` gathers every decoding knob (AR: temperature, top-k/p, repetition penalty, KV cache;
diffusion: strategy, steps, block length, threshold, budget, prefix cache). ``generate_text`` renders the prompt
(chat template for SFT checkpoints), calls ``sampling.ar.ar_generate`` or ``sampling.diffusion.diffusion_generate``
and returns a JSON-ready record with the timings and forward counts both paradigms are compared on.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from nanollada.loading import LoadedModel
from nanollada.sampling.ar import ar_generate
from nanollada.sampling.diffusion import (ConfidenceThreshold, LowConfidence, RandomRemask, Strategy,
                                          ThresholdTopKBudget, diffusion_generate, print_trace,
                                          trace_to_html)

MAX_PROMPT_CHARS = 100_000


@dataclass
class GenerationSettings:
    """Decoding settings for both paradigms.

    Args:
        max_new_tokens: Tokens to generate (AR: at most; diffusion: the canvas, rounded up to whole blocks).
        temperature: Sampling temperature; 0 = greedy (AR) / no Gumbel noise (diffusion).
        top_k: AR: keep the k most likely tokens (None = off).
        top_p: AR: nucleus sampling mass (None = off).
        repetition_penalty: AR: CTRL-style penalty on tokens already present (1.0 = off).
        use_kv_cache: AR: incremental decoding with the KV cache.
        strategy: Diffusion: ``low_confidence`` / ``random`` (LLaDA, fixed steps), ``threshold`` (Fast-dLLM),
            ``threshold_topk`` (v0.1.0 report: threshold + top-k + decode budget).
        steps: Diffusion: forwards per block for the fixed-step strategies.
        block_length: Diffusion: semi-autoregressive block length (None = one block of max_new_tokens).
        threshold: Diffusion: confidence threshold tau of ``threshold`` / ``threshold_topk``.
        commit_top_k: Diffusion: at most this many commits per step in ``threshold_topk``.
        budget: Diffusion: cap on forwards for ``threshold_topk`` (None = no cap).
        use_prefix_cache: Diffusion: Fast-dLLM prefix KV cache (prompt and finished blocks computed once per block).
        chat: Wrap the prompt in the chat template; None = automatically for SFT checkpoints.
        seed: Seed of every random draw, so outputs are reproducible.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    use_kv_cache: bool = True
    strategy: Literal["low_confidence", "random", "threshold", "threshold_topk"] = "low_confidence"
    steps: int | None = None
    block_length: int | None = 32
    threshold: float = 0.9
    commit_top_k: int = 4
    budget: int | None = None
    use_prefix_cache: bool = False
    chat: bool | None = None
    seed: int = 0

    def diffusion_strategy(self, block_length: int) -> Strategy:
        if self.strategy in ("low_confidence", "random"):
            steps = self.steps or block_length
            return (LowConfidence if self.strategy == "low_confidence" else RandomRemask)(steps)
        if self.strategy == "threshold":
            return ConfidenceThreshold(self.threshold)
        return ThresholdTopKBudget(self.threshold, self.commit_top_k, self.budget)


def encode_prompt(loaded: LoadedModel, prompt: str, chat: bool | None) -> list[int]:
    """Prompt ids (bos first); chat template for SFT checkpoints unless ``chat`` says otherwise."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("empty prompt: give some text to continue")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt of {len(prompt)} characters is longer than {MAX_PROMPT_CHARS}")
    tok = loaded.tokenizer
    use_chat = loaded.is_chat if chat is None else chat
    return tok.chat_prompt(prompt) if use_chat else [tok.bos_id] + tok.encode(prompt)


def _cut(ids: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


@torch.no_grad()
def generate_text(loaded: LoadedModel, prompt: str, settings: GenerationSettings, trace_path: str | None = None) -> dict:
    """Generate a completion of ``prompt``; returns prompt, completion, counts and timings (JSON-ready).

    trace_path: diffusion only, record the canvas after every step: ``"-"`` prints it to the terminal (stderr, one
    line per step), any other path gets a self-contained HTML page with a step slider (``trace_to_html``).
    """
    if trace_path and loaded.paradigm != "diffusion":
        raise ValueError("a denoising trace needs a diffusion checkpoint")
    tok, model = loaded.tokenizer, loaded.model
    ids = encode_prompt(loaded, prompt, settings.chat)
    device = next(model.parameters()).device
    room = model.cfg.max_seq_len - len(ids)
    if room < 1:
        raise ValueError(f"prompt of {len(ids)} tokens leaves no room in max_seq_len={model.cfg.max_seq_len}")
    g = torch.Generator(device=device).manual_seed(settings.seed)
    stops = {tok.eos_id, tok.im_end_id}
    record = {"prompt": prompt, "paradigm": loaded.paradigm, "prompt_tokens": len(ids)}
    if loaded.paradigm == "ar":
        out = ar_generate(model, [ids], max_new_tokens=min(settings.max_new_tokens, room),
                          temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                          repetition_penalty=settings.repetition_penalty, eos_id=tok.im_end_id if
                          (loaded.is_chat if settings.chat is None else settings.chat) else tok.eos_id,
                          pad_id=tok.pad_id, use_kv_cache=settings.use_kv_cache, generator=g)
        gen = _cut(list(out.generated[0]), stops)
        record.update(forwards=out.forwards, first_token_seconds=out.first_token_seconds, seconds=out.seconds,
                      generated_tokens=len(out.generated[0]))
    else:
        block = settings.block_length or settings.max_new_tokens
        gen_length = block * math.ceil(min(settings.max_new_tokens, room) / block)
        if gen_length > room:
            gen_length = block * (room // block)
            if gen_length == 0:
                raise ValueError(f"no room for one block of {block} tokens after a {len(ids)}-token prompt")
        out = diffusion_generate(model, torch.tensor([ids], device=device), gen_length=gen_length,
                                 block_length=block, strategy=settings.diffusion_strategy(block),
                                 mask_id=tok.mask_id, eos_id=tok.eos_id, temperature=settings.temperature,
                                 generator=g, use_prefix_cache=settings.use_prefix_cache,
                                 record_trace=trace_path is not None)
        def show(ids: list[int]) -> str:  # special tokens (eos) stay visible in the trace
            return "".join(tok.sp.id_to_piece(i) if i in tok.special_ids else tok.decode([i]) for i in ids)

        if trace_path == "-":
            print_trace(out.trace, show, mask_id=tok.mask_id, file=sys.stderr)
        elif trace_path:
            trace_to_html(out.trace, trace_path, show, mask_id=tok.mask_id, title=prompt[:80])
        gen = _cut(out.generated[0].tolist(), stops)
        record.update(forwards=out.forwards, first_token_seconds=out.first_round_seconds, seconds=out.seconds,
                      generated_tokens=gen_length, steps_per_block=out.steps_per_block)
    record.update(completion=tok.decode(gen), tokens=len(gen),
                  tokens_per_second=len(gen) / max(record["seconds"], 1e-9),
                  tokens_per_forward=len(gen) / max(record["forwards"], 1), settings=asdict(settings))
    return record
