"""The models behind ``nanollada serve``: prompts, settings, and generation serialised by one lock per model.

Concurrency: every served model has its own first-come-first-served lock (:class:`FifoLock`). A request runs in a
worker thread, waits for its model's lock, generates, and releases it; so one model answers one request at a time,
in arrival order (no request can be overtaken indefinitely), while different models run side by side. Nothing is shared between two requests but
the weights: each has its own seeded generator, KV cache and output buffers, so a request's text is the same
whether it ran alone or among others. A request whose client went away stops at its next step (``on_step``
returns True) or, still waiting for the lock, never starts.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from nanollada.generate import GenerationSettings, generate_text
from nanollada.serve.protocol import EXCLUDED_SETTINGS, APIError
from nanollada.streaming import TextStream, canvas_changes, fit_to_context, supports_editing


class FifoLock:
    """A lock granted in arrival order; a waiter whose ``cancelled`` event is set leaves the queue."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._held = False

    def acquire(self, cancelled: threading.Event | None = None, poll: float = 0.05) -> bool:
        """Wait for the lock in turn; False (without it) if ``cancelled`` is set first."""
        me = object()
        with self._cond:
            self._queue.append(me)
            try:
                while self._held or self._queue[0] is not me:
                    if cancelled is not None and cancelled.is_set():
                        return False
                    self._cond.wait(poll)
                self._held = True
                return True
            finally:
                self._queue.remove(me)
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def locked(self) -> bool:
        return self._held

    def waiting(self) -> int:
        return len(self._queue)


@dataclass
class Job:
    """One generation request, prepared and validated.

    Args:
        prompt_ids: The rendered prompt (bos first).
        settings: Resolved settings, fitted to the context (``max_new_tokens`` is the answer's limit).
        stops: Stop strings.
        canvas: Emit denoising frames (``{"type": "canvas", ...}`` events) as well as text.
        on_event: Called from the worker thread with every event (``delta``, ``canvas``); None for none.
    """

    prompt_ids: list[int]
    settings: GenerationSettings
    stops: tuple[str, ...] = ()
    canvas: bool = False
    on_event: Callable[[dict], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    stats: dict  # forwards, seconds, tokens_per_second, tokens_per_forward, queue_seconds, ...


def model_id_for(path: str) -> str:
    """A readable id for a checkpoint path: the run directory of ``logs/RUN/checkpoints/last.ckpt``, else the file
    stem."""
    p = Path(path)
    if p.parent.name == "checkpoints" and p.parent.parent.name:
        return p.parent.parent.name
    return p.stem


class ServedModel:
    """A loaded checkpoint served under ``model_id``, with the server-wide settings and its lock.

    Args:
        model_id: The ``model`` name clients use.
        loaded: A ``nanollada.loading.LoadedModel``.
        settings: Server-wide generation settings (per-request fields override them).
    """

    def __init__(self, model_id: str, loaded, settings: GenerationSettings):
        self.id, self.loaded, self.iface = model_id, loaded, loaded.interface
        self.tok = self.iface.tokenizer
        self.settings = settings
        self.lock = FifoLock()
        self.created = int(time.time())
        # requests answered, and those stopped because their client went away (with the forwards they had run)
        self.counters = {"completed": 0, "cancelled": 0, "cancelled_forwards": []}
        self._count = threading.Lock()
        self.settings.resolve(self.iface.default_generation())  # fail at start, not per request

    @property
    def max_seq_len(self) -> int:
        return self.iface.model.cfg.max_seq_len

    def info(self) -> dict:
        """The ``/v1/models`` entry: OpenAI's fields plus a ``nanollada`` block."""
        resolved = asdict(self.settings.resolve(self.iface.default_generation()))
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "nanollada",
                "nanollada": {"paradigm": self.iface.name, "chat": bool(self.iface.is_chat),
                              "canvas": bool(self.iface.supports_trace), "editing": supports_editing(self.iface),
                              "max_seq_len": self.max_seq_len,
                              "parameters": sum(p.numel() for p in self.iface.model.parameters()),
                              "checkpoint": str(self.loaded.path), "defaults": resolved,
                              "requests": {k: self.counters[k] for k in ("completed", "cancelled")}}}

    # ------------------------------------------------------------------ prompts
    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Chat checkpoints: the chat template over the messages; pretraining ones: the messages' text joined by
        newlines, continued as plain text."""
        for m in messages:
            if len(m["content"]) > 100_000:
                raise APIError(400, "a message is longer than 100000 characters", param="messages")
        if self.iface.is_chat:
            return self.tok.render_chat(messages, add_generation_prompt=True)[0]
        text = "\n".join(m["content"] for m in messages if m["content"])
        if not text.strip():
            raise APIError(400, "the messages have no text to continue", param="messages")
        return [self.tok.bos_id] + self.tok.encode(text)

    def completion_ids(self, prompt: str) -> list[int]:
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt) > 100_000:
            raise APIError(400, "the prompt is longer than 100000 characters", param="prompt")
        return [self.tok.bos_id] + self.tok.encode(prompt)

    # ------------------------------------------------------------------ settings
    def settings_for(self, prompt_len: int, max_tokens: int | None, fields: dict, extra: dict | None
                     ) -> tuple[GenerationSettings, bool]:
        """The request's settings: the server's, then OpenAI fields (temperature, top_p, seed), then the
        ``nanollada`` block; resolved for this paradigm and fitted to the context. Returns (settings, canvas)."""
        extra = dict(extra or {})
        canvas = extra.pop("canvas", False)
        if not isinstance(canvas, bool):
            raise APIError(400, f"nanollada.canvas must be true or false, got {canvas!r}", param="nanollada.canvas")
        for k in extra:
            if k in EXCLUDED_SETTINGS:
                raise APIError(400, f"nanollada.{k} is not accepted here: "
                               + ("use max_tokens" if k == "max_new_tokens" else "the endpoint decides the template"),
                               param=f"nanollada.{k}")
        changes = {k: v for k, v in fields.items() if v is not None}
        for k, v in extra.items():
            if k in changes and changes[k] != v:
                raise APIError(400, f"{k} is given twice (top level and nanollada.{k}) with different values",
                               param=f"nanollada.{k}")
        changes.update(extra)
        try:
            settings = self.settings.updated(**changes)
            settings = settings.resolve(self.iface.default_generation())
        except ValueError as e:
            msg = str(e).replace("--", "")
            name = next((k for k in changes if msg.startswith(k)), None)
            param = name if name in fields else f"nanollada.{name}" if name else "nanollada"
            raise APIError(400, msg, param=param) from None
        room = self.max_seq_len - prompt_len
        if max_tokens is not None and prompt_len + max_tokens > self.max_seq_len:
            raise APIError(400, f"This model's maximum context length is {self.max_seq_len} tokens. However, you "
                           f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in "
                           "the completion). Please reduce the length of the prompt or the completion.",
                           param="max_tokens" if room > 0 else "messages", code="context_length_exceeded")
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.max_seq_len} tokens, and the prompt "
                           f"has {prompt_len}: no room is left for the completion.", param="messages",
                           code="context_length_exceeded")
        if max_tokens is not None:
            settings = settings.updated(max_new_tokens=max_tokens)
        return fit_to_context(self.max_seq_len, prompt_len, settings), canvas

    # ------------------------------------------------------------------ generation
    def run(self, job: Job) -> Result | None:
        """Generate ``job`` (in a worker thread): wait for this model's lock, stream events, return the result;
        None when the client went away first."""
        queued = time.perf_counter()
        if not self.lock.acquire(job.cancelled):
            return None
        try:
            if job.cancelled.is_set():
                return None
            return self._generate(job, time.perf_counter() - queued)
        finally:
            self.lock.release()

    def _generate(self, job: Job, queue_seconds: float) -> Result:
        tok, s = self.tok, job.settings
        limit = s.max_new_tokens
        stream = TextStream.for_answer(self.iface, s, len(job.prompt_ids), stop_strings=job.stops, limit=limit)
        emit = job.on_event or (lambda event: None)
        state = {"prev": None, "step": 0}
        frames = job.canvas and self.iface.supports_trace

        def on_step(tokens: list[int]) -> bool:
            if frames:
                changes = canvas_changes(state["prev"], tokens, tok.mask_id)
                state["prev"], state["step"] = list(tokens), state["step"] + 1
                emit({"type": "canvas", "step": state["step"], "length": len(tokens),
                      "masked": sum(t == tok.mask_id for t in tokens),
                      "changes": [[i, None if t is None else cell_text(tok, t), kind] for i, t, kind in changes]})
            delta = stream.update(tokens)
            if delta:
                emit({"type": "delta", "text": delta})
            return job.cancelled.is_set() or stream.stopped

        rec = generate_text(self.iface, "", s, on_step=on_step, prompt_ids=job.prompt_ids, return_ids=True)
        with self._count:
            if job.cancelled.is_set():
                self.counters["cancelled"] += 1
                self.counters["cancelled_forwards"] = (self.counters["cancelled_forwards"] + [rec["forwards"]])[-16:]
            else:
                self.counters["completed"] += 1
        if not job.cancelled.is_set():
            tail = stream.finish(rec["completion_ids"])
            if tail:
                emit({"type": "delta", "text": tail})
        model_stopped = rec["generated_tokens"] > rec["tokens"]  # a stop token (eos / <|im_end|>) ended it
        reason = stream.reason or ("stop" if model_stopped else "length")
        n = stream.token_count()
        stats = {"forwards": rec["forwards"], "seconds": rec["seconds"], "queue_seconds": queue_seconds,
                 "first_token_seconds": rec["first_token_seconds"], "generated_tokens": rec["generated_tokens"],
                 "tokens_per_second": n / max(rec["seconds"], 1e-9),
                 "tokens_per_forward": n / max(rec["forwards"], 1), "paradigm": self.iface.name,
                 "settings": rec["settings"]}
        for k in ("steps_per_block", "block_length", "editing", "edits", "tau_mask", "tau_edit"):  # what applies
            if k in rec:
                stats[k] = rec[k]
        return Result(stream.emitted, reason, len(job.prompt_ids), n, stats)


def cell_text(tok, t: int) -> str:
    """One canvas position as text: the token's text, or its piece for special tokens (eos shows as ``</s>``)."""
    if t in tok.special_ids:
        return tok.sp.id_to_piece(t)
    return tok.decode([t])
