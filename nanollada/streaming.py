"""Streaming text out of a growing answer, for ``chat`` and ``serve``: settled text, stop strings, canvas frames.

A paradigm's ``on_step(tokens)`` reports the answer as it grows: AR the tokens so far, diffusion the whole canvas
with masks (``tokenizer.mask_id``). :class:`TextStream` turns those reports into text deltas that never have to be
taken back:

- AR: every token is final, the text grows token by token;
- diffusion: a block is final once decoding has moved on to a later block (a decoder may still change the block
  it is working on, masks or not: LLaDA 2.1 editing), so text arrives block by block, the last block at the end.
  Masked diffusion's blocks start with the answer; block diffusion's lie at absolute positions, so the answer's
  first block is the rest of the prompt's last one (``block_offset``; :meth:`TextStream.for_answer` sets both);
- the answer ends at the first stop id (eos, ``<|im_end|>``) and at the first stop string (OpenAI's ``stop``);
- text that may still change is held back: a trailing incomplete UTF-8 character (byte-fallback pieces decode to
  U+FFFD until the character is complete) and a tail that could be the start of a stop string.

:func:`canvas_changes` gives what changed between two canvases (positions filled, edited or re-masked), the frames
the web page animates. :func:`applicable_settings` lists the generation settings a paradigm's decoder reads (what
``chat``'s ``/settings`` shows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass
class TextStream:
    """Incremental, never-revised text of one answer.

    Args:
        tokenizer: The model's ``nanollada.tokenizer.Tokenizer``.
        stop_ids: Token ids that end the answer (not part of it), e.g. ``Paradigm.stop_ids()``.
        stop_strings: Strings that end the answer (not part of it), OpenAI's ``stop``.
        block_length: Diffusion: a canvas settles in whole blocks of this length (None = only once it has no masks).
        limit: At most this many tokens of the answer (None = no limit).
        block_offset: Block diffusion: the absolute position of the canvas's first token modulo ``block_length``
            (the prompt length: blocks lie at absolute positions); 0 when blocks start with the answer.
    """

    tokenizer: object
    stop_ids: set = field(default_factory=set)
    stop_strings: tuple = ()
    block_length: int | None = None
    limit: int | None = None
    emitted: str = ""
    reason: str | None = None  # why the text ended early: "stop" (stop id / stop string) or "length" (limit)
    revised: bool = False  # the final text did not extend the streamed one (a decoder rewrote a settled block)
    _tokens: list = field(default_factory=list)
    block_offset: int = 0

    @classmethod
    def for_answer(cls, paradigm, settings, prompt_len: int, **kwargs) -> "TextStream":
        """The stream of one answer of ``paradigm`` with resolved ``settings`` after a ``prompt_len``-token prompt:
        its stop ids; for paradigms with a canvas, the decode block and where the blocks lie (AR: none, every token
        is final)."""
        block, offset = None, 0
        if paradigm.supports_trace:
            block = settings.block_length or getattr(paradigm, "block_size", None)
            if block and getattr(paradigm, "absolute_blocks", False):
                offset = prompt_len % block
        return cls(paradigm.tokenizer, stop_ids=paradigm.stop_ids(), block_length=block, block_offset=offset,
                   **kwargs)

    @property
    def stopped(self) -> bool:
        """The answer is complete: a stop id, a stop string or the token limit was reached."""
        return self.reason is not None

    def settle(self, tokens: list[int], final: bool = False) -> tuple[list[int], str | None]:
        """(the part of ``tokens`` that can no longer change, cut before the first stop id and at ``limit``; the
        reason it was cut, if it was)."""
        end, mask = len(tokens), self.tokenizer.mask_id
        if not final and self.block_length and tokens:
            # the blocks before the one being decoded: the block of the first mask (none left: the last block), or
            # an earlier one while a complete block awaits its edit-only steps (no token after it yet)
            L, off = self.block_length, self.block_offset
            current = tokens.index(mask) if mask in tokens else len(tokens) - 1
            last = max((i for i, t in enumerate(tokens) if t != mask), default=0)
            end = max(min(current - (current + off) % L, last - (last + off) % L), 0)
        elif not final and mask in tokens:
            end = 0
        for i in range(end):
            if tokens[i] in self.stop_ids:
                if self.limit is not None and i > self.limit:
                    return tokens[:self.limit], "length"
                return tokens[:i], "stop"
        if self.limit is not None and end >= self.limit:
            return tokens[:self.limit], "length"
        return tokens[:end], None

    def _text(self, tokens: list[int]) -> tuple[str, bool]:
        """(text of tokens cut at the first stop string, whether one was found)."""
        text = self.tokenizer.decode(tokens)
        cut = min((text.find(s) for s in self.stop_strings if s and s in text), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def update(self, tokens: list[int]) -> str:
        """New settled text after an ``on_step`` report (the whole answer or canvas so far); '' when none."""
        return self._consume(list(tokens), final=False)

    def finish(self, tokens: list[int]) -> str:
        """The rest of the text once generation is over (``tokens``: the final answer)."""
        return self._consume(list(tokens), final=True)

    def _consume(self, tokens: list[int], final: bool) -> str:
        if self.stopped:
            return ""
        settled, reason = self.settle(tokens, final)
        text, hit_stop = self._text(settled)
        self._tokens = settled
        if hit_stop:
            reason = "stop"
        if reason:
            self.reason = reason
        elif not final:
            text = self._hold_back(text)
        return self._advance(text)

    @property
    def text(self) -> str:
        return self.emitted

    def token_count(self) -> int:
        """Tokens of the answer that the emitted text covers (the stop-string cut included): usage counts."""
        toks = self._tokens
        if self.tokenizer.decode(toks) == self.emitted:
            return len(toks)
        n = 0
        while n < len(toks) and len(self.tokenizer.decode(toks[:n])) < len(self.emitted):
            n += 1
        return n

    def _hold_back(self, text: str) -> str:
        text = text.rstrip("\ufffd")
        keep = len(text)
        for s in self.stop_strings:  # a tail that could still become a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = min(keep, len(text) - k)
                    break
        return text[:keep]

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):  # settled text does not change; if a decoder did change it anyway,
            self.emitted, self.revised = text, True  # the final text wins (streamed text cannot be taken back)
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta


def canvas_changes(prev: list[int] | None, cur: list[int], mask_id: int) -> list[tuple[int, int | None, str]]:
    """What changed from canvas ``prev`` to ``cur`` (lists of ids, masks as ``mask_id``; None = all masked):
    ``(position, id or None for a mask, kind)`` with kind ``fill`` (mask -> token), ``edit`` (token -> another
    token) or ``remask`` (token -> mask)."""
    out = []
    for i, t in enumerate(cur):
        p = mask_id if prev is None or i >= len(prev) else prev[i]
        if t == p:
            continue
        if t == mask_id:
            out.append((i, None, "remask"))
        else:
            out.append((i, t, "fill" if p == mask_id else "edit"))
    return out


def fit_to_context(max_seq_len: int, prompt_len: int, settings):
    """``settings`` with ``max_new_tokens`` capped to the room left after the prompt and a diffusion block no longer
    than the answer; ValueError when the prompt leaves no room at all."""
    room = max_seq_len - prompt_len
    if room < 1:
        raise ValueError(f"the prompt has {prompt_len} tokens and leaves no room for an answer in "
                         f"max_seq_len={max_seq_len}")
    n = min(settings.max_new_tokens, room)
    block = settings.block_length if settings.block_length is None else min(settings.block_length, n)
    if (n, block) != (settings.max_new_tokens, settings.block_length):
        settings = replace(settings, max_new_tokens=n, block_length=block)
    return settings


AR_SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "use_kv_cache")
DIFFUSION_SETTINGS = ("max_new_tokens", "temperature", "strategy", "steps", "block_length", "threshold",
                      "commit_top_k", "budget", "use_prefix_cache", "cfg_scale", "min_new_tokens", "eos_after_text")
STRATEGY_SETTINGS = ("strategy", "steps", "threshold", "commit_top_k", "budget")  # replaced by editing's thresholds


def supports_editing(paradigm) -> bool:
    """Whether the paradigm's decoder reads ``editing`` (LLaDA 2.1 token editing: block diffusion)."""
    return bool(getattr(paradigm, "supports_editing", False))


def applicable_settings(paradigm, settings) -> dict:
    """The generation settings ``paradigm``'s decoder reads, from resolved ``settings``, in display order; ``seed``
    and ``greedy`` last. AR: the sampler's knobs and the KV cache; masked diffusion: the strategy's, the block, the
    prefix cache, guidance and the eos rules; block diffusion: the same with its exact block cache (``use_kv_cache``)
    and ``editing``. With editing on, decoding is threshold decoding at the preset's (or, ``custom``, the given)
    ``tau_mask`` / ``tau_edit``, so those replace the strategy and ``threshold``, with the post-edit step cap and the
    edit penalty."""
    r = asdict(settings)
    if not paradigm.supports_trace:
        keys = list(AR_SETTINGS)
    else:
        keys = list(DIFFUSION_SETTINGS)
        if supports_editing(paradigm):
            keys[keys.index("use_prefix_cache")] = "use_kv_cache"
            keys.append("editing")
    out = {k: r[k] for k in keys}
    editing = settings.editing_thresholds() if "editing" in out else None
    if editing:
        for k in STRATEGY_SETTINGS:
            out.pop(k)
        out.update(tau_mask=editing[0], tau_edit=editing[1], max_post_edit_steps=r["max_post_edit_steps"],
                   edit_penalty=r["edit_penalty"])
    return {**out, "seed": r["seed"], "greedy": r["greedy"]}
