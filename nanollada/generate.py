"""Text in, text out, for every paradigm: the front end that ``predict``, ``compare``, ``chat`` and ``serve`` share.

``GenerationSettings`` gathers every decoding knob (AR: temperature, top-k/p, repetition penalty, KV cache;
diffusion: strategy, steps, block length, threshold, budget, prefix cache) and validates them in one place.
``generate_text`` renders the prompt (chat template for SFT checkpoints), asks the checkpoint's
``nanollada.paradigms.Paradigm`` to decode, and returns a JSON-ready record with the timings and forward counts the
paradigms are compared on.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

import torch

from nanollada.sampling.diffusion import STRATEGIES, print_trace, trace_to_html

MAX_PROMPT_CHARS = 100_000
# LLaDA 2.1 editing presets (tau_mask, tau_edit). The report gives no numbers; these are public implementations'
# defaults: SGLang JointThreshold (0.5, 0.0) for speedy, the diffusers LLaDA2 example (0.7, 0.5) for quality; HF
# modeling_llada21_moe uses (0.95, 0.9) (``editing: custom`` with those thresholds).
EDITING_PRESETS = {"speedy": (0.5, 0.0), "quality": (0.7, 0.5)}


@dataclass
class GenerationSettings:
    """Decoding settings for every paradigm.

    A field left None where the type allows "or the paradigm's default" (temperature, top_p, repetition_penalty,
    strategy, use_prefix_cache) takes the value the checkpoint's paradigm chooses (``Paradigm.default_generation``;
    :meth:`resolve` fills them in): AR samples with temperature / top-p / a mild repetition penalty, masked
    diffusion decodes with the confidence threshold and the prefix cache. ``greedy`` is the one flag back to
    deterministic argmax decoding.

    Args:
        max_new_tokens: Tokens to generate (AR: at most; diffusion: the canvas, rounded up to whole blocks).
        temperature: Sampling temperature; 0 = greedy (AR) / no Gumbel noise (diffusion); None = the paradigm's
            default.
        top_k: AR: keep the k most likely tokens (None = off).
        top_p: AR: nucleus sampling mass (1 = off; None = the paradigm's default).
        repetition_penalty: AR: CTRL-style penalty on tokens already present (1.0 = off; None = the paradigm's
            default).
        use_kv_cache: AR: incremental decoding with the KV cache.
        strategy: Diffusion: ``low_confidence`` / ``random`` (LLaDA, fixed steps), ``threshold`` (Fast-dLLM),
            ``threshold_topk`` (v0.1.0 report: threshold + top-k + decode budget); None = the paradigm's default.
        steps: Diffusion: forwards per block for the fixed-step strategies.
        block_length: Diffusion: semi-autoregressive block length (masked diffusion) or decode block (block
            diffusion); None = the paradigm's default (32; block diffusion: the block size it was trained with). One
            block of the whole answer: ``--block_length`` = ``--max_new_tokens``.
        threshold: Diffusion: confidence threshold tau of ``threshold`` / ``threshold_topk``; None = the paradigm's
            default (0.9; block diffusion 0.95, LLaDA 2.0 / dInfer).
        commit_top_k: Diffusion: at most this many commits per step in ``threshold_topk``.
        budget: Diffusion: cap on forwards for ``threshold_topk`` (None = no cap).
        use_prefix_cache: Diffusion: Fast-dLLM prefix KV cache (prompt and finished blocks computed once per block);
            None = the paradigm's default.
        chat: Wrap the prompt in the chat template; None = automatically for SFT checkpoints.
        greedy: Deterministic decoding: temperature 0, and top-p / repetition penalty off unless set explicitly.
        seed: Seed of every random draw, so outputs are reproducible.
        editing: Block diffusion: LLaDA 2.1 token editing (committed tokens of the current block may be rewritten):
            ``off``; ``speedy`` (threshold 0.5, edit_threshold 0.0: commit early, repair by edits -- SGLang's
            JointThreshold defaults); ``quality`` (threshold 0.7, edit_threshold 0.5 -- the diffusers LLaDA2
            example); ``custom`` (``threshold`` and ``edit_threshold`` as given; HF LLaDA2.1 uses 0.95 / 0.9).
        edit_threshold: Block diffusion, ``editing: custom``: rewrite a committed token when the model's argmax
            differs from it with probability above this (tau_edit; 1 = never).
        max_post_edit_steps: Block diffusion editing: edit-only steps allowed after a block has no masks left.
        edit_penalty: Block diffusion editing: subtract this from the logit of the previous position's token
            (SGLang's ``penalty_lambda``, against n-gram stutter; 0 = off).
        min_new_tokens: Diffusion decoders: no eos / ``<|im_end|>`` in the first this many answer positions (LLaDA's
            ``logits_eos_inf``; 0 = off).
        eos_after_text: Diffusion decoders: commit eos / ``<|im_end|>`` only once every earlier answer position is
            filled (LLaDA's ``confidence_eos_eot_inf``), against answers that end before they start.
        cfg_scale: Diffusion decoders: classifier-free guidance weight w (LLaDA): logits un + (w + 1) (cond - un),
            the unconditional pass being the canvas with the prompt masked, batched into the same forward (twice
            the compute per step); 0 = off. Best with a model SFT-trained with ``prompt_dropout``.
    """

    max_new_tokens: int = 128
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    use_kv_cache: bool = True
    strategy: Literal["low_confidence", "random", "threshold", "threshold_topk"] | None = None
    steps: int | None = None
    block_length: int | None = None
    threshold: float | None = None
    commit_top_k: int = 4
    budget: int | None = None
    use_prefix_cache: bool | None = None
    chat: bool | None = None
    greedy: bool = False
    seed: int = 0
    editing: Literal["off", "speedy", "quality", "custom"] = "off"
    edit_threshold: float = 0.9
    max_post_edit_steps: int = 16
    edit_penalty: float = 0.0
    cfg_scale: float = 0.0
    min_new_tokens: int = 0
    eos_after_text: bool = False

    def __post_init__(self) -> None:
        """Reject meaningless values with the flag, the value and the allowed range."""
        def bad(flag, value, allowed):
            raise ValueError(f"--{flag} {value!r} is out of range: allowed {allowed}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, ">= 1 (an integer)")
        if self.temperature is not None and self.temperature < 0:
            bad("temperature", self.temperature, ">= 0 (0 = greedy), or null for the paradigm's default")
        if self.top_k is not None and self.top_k < 1:
            bad("top_k", self.top_k, ">= 1, or null for off")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "(0, 1] (1 = off), or null for the paradigm's default")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "> 0 (1 = off), or null for the paradigm's default")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            bad("strategy", self.strategy, f"one of {sorted(STRATEGIES)}, or null for the paradigm's default")
        if self.greedy and self.temperature:
            raise ValueError(f"--greedy true conflicts with --temperature {self.temperature!r}: greedy decoding is "
                             "temperature 0")
        if self.steps is not None and self.steps < 1:
            bad("steps", self.steps, ">= 1, or null for one step per block position")
        if self.block_length is not None and self.block_length < 1:
            bad("block_length", self.block_length, ">= 1, or null for the paradigm's default")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            bad("threshold", self.threshold, "[0, 1]")
        if self.commit_top_k < 1:
            bad("commit_top_k", self.commit_top_k, ">= 1")
        if self.budget is not None and self.budget < 1:
            bad("budget", self.budget, ">= 1, or null for no cap")
        if not 0 <= self.edit_threshold <= 1:
            bad("edit_threshold", self.edit_threshold, "[0, 1]")
        if self.max_post_edit_steps < 0:
            bad("max_post_edit_steps", self.max_post_edit_steps, ">= 0")
        if self.edit_penalty < 0:
            bad("edit_penalty", self.edit_penalty, ">= 0 (0 = off)")
        if self.cfg_scale < 0:
            bad("cfg_scale", self.cfg_scale, ">= 0 (0 = off)")
        if self.min_new_tokens < 0:
            bad("min_new_tokens", self.min_new_tokens, ">= 0 (0 = off)")
        if self.editing not in EDITING_PRESETS and self.editing not in ("off", "custom"):
            bad("editing", self.editing, f"off, custom or one of {sorted(EDITING_PRESETS)}")

    def editing_thresholds(self) -> tuple[float, float] | None:
        """(tau_mask, tau_edit) of the editing decoder, or None when editing is off."""
        if self.editing == "off":
            return None
        if self.editing == "custom":
            return self.threshold, self.edit_threshold
        return EDITING_PRESETS[self.editing]

    def resolve(self, defaults: dict) -> "GenerationSettings":
        """These settings with every field left None in :data:`PARADIGM_DEFAULT_FIELDS` filled in: ``greedy`` first
        (temperature 0, top-p and repetition penalty off), then ``defaults`` (a ``Paradigm.default_generation()``).
        Explicit values always win; resolving twice changes nothing."""
        fill = {}
        if self.greedy:
            fill.update(temperature=0.0, top_p=1.0, repetition_penalty=1.0)
        fill = {k: v for k, v in {**defaults, **fill}.items()
                if k in PARADIGM_DEFAULT_FIELDS and getattr(self, k) is None}
        missing = [k for k in PARADIGM_DEFAULT_FIELDS if getattr(self, k) is None and k not in fill]
        if missing:
            raise ValueError(f"no default for {missing}: Paradigm.default_generation() must name every field of "
                             f"{PARADIGM_DEFAULT_FIELDS}")
        return replace(self, **fill) if fill else self

    def updated(self, **changes) -> "GenerationSettings":
        """A copy with ``changes`` (JSON-typed values: from a request body, or ``/set key=value`` in chat), each
        checked against its field's type first; ValueError naming the field otherwise."""
        hints = get_type_hints(GenerationSettings)
        for name, value in changes.items():
            if name not in hints:
                raise ValueError(f"unknown generation setting {name!r}; known: {', '.join(hints)}")
            changes[name] = _check_type(name, value, hints[name])
        return replace(self, **changes)


PARADIGM_DEFAULT_FIELDS = ("temperature", "top_p", "repetition_penalty", "strategy", "use_prefix_cache",
                           "block_length", "threshold")


def _check_type(name: str, value, hint):
    """``value`` as field ``name`` of type ``hint`` takes it (an int where a float is expected becomes a float)."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    literals = [x for o in options if get_origin(o) is Literal for x in get_args(o)]
    if value is None and type(None) in options:
        return None
    if isinstance(value, bool):
        if bool in options:
            return value
    elif isinstance(value, int) and int in options:
        return value
    elif isinstance(value, (int, float)) and float in options:
        return float(value)
    elif isinstance(value, str) and value in literals:
        return value
    allowed = [{int: "an integer", float: "a number", bool: "true/false", type(None): "null"}.get(o, "")
               for o in options if get_origin(o) is not Literal] + ([f"one of {literals}"] if literals else [])
    raise ValueError(f"{name}={value!r} has the wrong type: expected {' or '.join(a for a in allowed if a)}")


def encode_prompt(interface, prompt: str, chat: bool | None) -> list[int]:
    """Prompt ids (bos first); chat template for SFT checkpoints unless ``chat`` says otherwise."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("empty prompt: give some text to continue")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt of {len(prompt)} characters is longer than {MAX_PROMPT_CHARS}")
    tok = interface.tokenizer
    use_chat = interface.is_chat if chat is None else chat
    return tok.chat_prompt(prompt) if use_chat else [tok.bos_id] + tok.encode(prompt)


def show_tokens(tok, ids: list[int]) -> str:
    """Text of ids with special tokens (eos, masks) visible as their pieces, for traces."""
    return "".join(tok.sp.id_to_piece(i) if i in tok.special_ids else tok.decode([i]) for i in ids)


@torch.no_grad()
def generate_text(interface, prompt: str, settings: GenerationSettings, trace_path: str | None = None,
                  on_step=None, prompt_ids: list[int] | None = None, return_ids: bool = False) -> dict:
    """Generate a completion of ``prompt`` with a ``Paradigm`` (or a ``LoadedModel``, whose ``interface`` is used);
    returns prompt, completion, counts and timings (JSON-ready). ``settings`` fields left to the paradigm's default
    are resolved first (``GenerationSettings.resolve``); the record's ``settings`` are the resolved ones.

    trace_path: record the denoising canvas after every step (paradigms with ``supports_trace``): ``"-"`` prints it
    to the terminal (stderr, one line per step), any other path gets a self-contained HTML page with a step slider.
    on_step: streaming callback, see ``Paradigm.generate``.
    prompt_ids: the prompt already rendered (bos first, e.g. a multi-turn chat); ``prompt`` is then only recorded.
    return_ids: also return the token ids (``prompt_ids``, ``completion_ids``), for streaming and usage counts.
    """
    interface = getattr(interface, "interface", interface)
    if trace_path and not interface.supports_trace:
        raise ValueError(f"a denoising trace needs a diffusion checkpoint (this one is {interface.name})")
    settings = settings.resolve(interface.default_generation())
    tok, model = interface.tokenizer, interface.model
    ids = list(prompt_ids) if prompt_ids is not None else encode_prompt(interface, prompt, settings.chat)
    room = model.cfg.max_seq_len - len(ids)
    if room < 1:
        raise ValueError(f"prompt of {len(ids)} tokens leaves no room in max_seq_len={model.cfg.max_seq_len}")
    notes = []
    if settings.max_new_tokens > room:
        notes.append(f"max_new_tokens {settings.max_new_tokens} capped to the {room} positions left in "
                     f"max_seq_len={model.cfg.max_seq_len} after the {len(ids)}-token prompt")
    out = interface.generate(ids, settings, record_trace=trace_path is not None, on_step=on_step)
    if trace_path == "-":
        print_trace([c[None] for c in out.trace], lambda t: show_tokens(tok, t), mask_id=tok.mask_id,
                    file=sys.stderr)
    elif trace_path:
        trace_to_html([c[None] for c in out.trace], trace_path, lambda t: show_tokens(tok, t), mask_id=tok.mask_id,
                      title=prompt[:80])
    record = {"prompt": prompt, "paradigm": interface.name, "prompt_tokens": len(ids),
              "completion": tok.decode(out.tokens), "tokens": len(out.tokens), "generated_tokens": out.produced,
              "forwards": out.forwards, "first_token_seconds": out.first_token_seconds, "seconds": out.seconds,
              "tokens_per_second": len(out.tokens) / max(out.seconds, 1e-9),
              "tokens_per_forward": len(out.tokens) / max(out.forwards, 1), **out.extra,
              "settings": asdict(settings)}
    if out.stopped_early:
        record["stopped_early"] = True
    if return_ids:
        record.update(prompt_ids=ids, completion_ids=list(out.tokens))
    if notes:
        record["notes"] = notes
    return record
