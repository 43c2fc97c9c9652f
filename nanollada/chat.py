"""``nanollada chat``: a multi-turn REPL over a checkpoint of any paradigm, streaming its answers.

SFT checkpoints get the chat template over the whole conversation (optional system prompt); when the conversation
no longer fits ``max_seq_len`` with room for ``max_new_tokens``, the oldest turns are dropped from what the model
sees (and the REPL says so; ``/save`` still writes them). Pretraining checkpoints have no template: every message is
continued as plain text, without history (said at start).

Answers stream as they settle (``nanollada.streaming.TextStream``): AR token by token, diffusion block by block; with
``--show_denoising true`` the live canvas is drawn instead (masks as ``░``, freshly filled tokens highlighted on a
terminal, one line per step otherwise). Ctrl-C stops the answer being written (the part so far is kept) and
returns to the prompt; Ctrl-C at the prompt does not leave, Ctrl-D or ``/quit`` does.

Commands: ``/reset``, ``/set key=value ...`` (any generation setting, validated), ``/settings``, ``/system TEXT``,
``/save FILE.jsonl``, ``/help``, ``/quit``.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time
import unicodedata
from dataclasses import asdict
from typing import Callable, TextIO

from nanollada.generate import GenerationSettings, generate_text
from nanollada.streaming import TextStream, applicable_settings, canvas_changes, fit_to_context

HELP = """commands:
  /reset               forget the conversation (the system prompt stays)
  /set key=value ...   change generation settings, e.g. /set temperature=0.7 top_p=0.9, /set greedy=true,
                       /set strategy=low_confidence steps=16 (null = the paradigm's default)
  /settings            show the settings in effect
  /system TEXT         set the system prompt (empty: none); applies from the next message
  /save FILE.jsonl     append this conversation to FILE.jsonl ({"conversations": [...]}: the SFT format)
  /help                this text
  /quit                leave (or Ctrl-D)
Ctrl-C stops the answer being written; a line ending in \\ continues on the next line."""


def display_width(text: str) -> int:
    """Terminal columns of ``text`` (wide East Asian characters count two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1 for c in text)


def printable(text: str) -> str:
    """Text for a terminal: control characters (other than newline and tab) escaped, never echoed raw."""
    return "".join(c if c in "\n\t" or c.isprintable() else repr(c)[1:-1] for c in text)


class ChatSession:
    """One conversation with one model: history, settings and the rendering of the prompt.

    Args:
        loaded: A ``nanollada.loading.LoadedModel`` (or anything with ``interface``).
        settings: Generation settings (fields left None take the paradigm's defaults).
        system: System prompt of chat checkpoints (None = none).
    """

    def __init__(self, loaded, settings: GenerationSettings, system: str | None = None):
        self.loaded, self.iface = loaded, getattr(loaded, "interface", loaded)
        self.tok = self.iface.tokenizer
        self.settings = settings
        self.system = system or None
        self.history: list[dict] = []  # user / assistant messages, all of them
        self.stats: list[dict] = []  # one record per answer
        self.window = 0  # index in history of the oldest message the model still sees

    @property
    def is_chat(self) -> bool:
        return bool(self.iface.is_chat)

    @property
    def max_seq_len(self) -> int:
        return self.iface.model.cfg.max_seq_len

    def resolved(self) -> GenerationSettings:
        return self.settings.resolve(self.iface.default_generation())

    def reset(self) -> None:
        self.history, self.window = [], 0

    def render(self, user_text: str) -> tuple[list[int], list[str]]:
        """Prompt ids for the next answer to ``user_text`` and the notes to show (turns dropped, text cut)."""
        notes = []
        want = self.settings.max_new_tokens
        if not self.is_chat:
            ids = self.tok.encode(user_text)
            keep = self.max_seq_len - 1 - min(want, self.max_seq_len // 2)
            if len(ids) > keep:
                notes.append(f"the text has {len(ids)} tokens; only its last {keep} fit max_seq_len="
                             f"{self.max_seq_len} with room for the answer")
                ids = ids[-keep:]
            return [self.tok.bos_id] + ids, notes
        head = [{"role": "system", "content": self.system}] if self.system else []
        turn = [{"role": "user", "content": user_text}]
        before = self.window
        while True:
            ids = self.tok.render_chat(head + self.history[self.window:] + turn, add_generation_prompt=True)[0]
            if len(ids) + want <= self.max_seq_len or self.window >= len(self.history):
                break
            self.window += 2  # one user message and its answer
        if self.window > before:
            dropped = self.window // 2
            notes.append(f"history: the oldest {dropped} turn(s) no longer fit max_seq_len={self.max_seq_len} with "
                         f"room for {want} new tokens; the model sees the last {len(self.history[self.window:]) // 2}"
                         f" turn(s) and this message")
        if len(ids) + want > self.max_seq_len:
            notes.append(f"this message leaves room for only {max(self.max_seq_len - len(ids), 0)} of the "
                         f"{want} new tokens (max_seq_len={self.max_seq_len})")
        return ids, notes

    def prepare(self, user_text: str) -> tuple[list[int], GenerationSettings, list[str]]:
        """(prompt ids, the settings the answer will use, notes) for the next answer to ``user_text``."""
        ids, notes = self.render(user_text)
        return ids, fit_to_context(self.max_seq_len, len(ids), self.resolved()), notes

    def answer(self, user_text: str, on_step: Callable[[list[int]], bool | None] | None = None,
               prepared: tuple | None = None) -> tuple[dict, GenerationSettings]:
        """Generate the answer to ``user_text`` (``on_step`` as in ``Paradigm.generate``; ``prepared``: what
        :meth:`prepare` returned); returns the record and the settings used. Record the turn with :meth:`commit`."""
        ids, settings, notes = prepared or self.prepare(user_text)
        rec = generate_text(self.iface, user_text, settings, on_step=on_step, prompt_ids=ids, return_ids=True)
        rec["notes"] = notes + rec.get("notes", [])
        return rec, settings

    def commit(self, user_text: str, answer_text: str, rec: dict) -> None:
        """Record a turn (pretraining checkpoints too, for ``/save``; their prompts never use the history)."""
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer_text}]
        self.stats.append({k: rec[k] for k in ("tokens", "forwards", "seconds", "tokens_per_second",
                                              "tokens_per_forward") if k in rec})

    def record(self) -> dict:
        """This conversation as an SFT-format record plus where it came from."""
        head = [{"role": "system", "content": self.system}] if self.system and self.is_chat else []
        return {"conversations": head + self.history, "checkpoint": str(getattr(self.loaded, "path", "")),
                "paradigm": self.iface.name, "mode": "chat" if self.is_chat else "continuation",
                "settings": asdict(self.resolved()), "stats": self.stats}


class CanvasView:
    """The live denoising canvas in a terminal: redrawn in place on a tty, one line per step otherwise."""

    def __init__(self, tok, out: TextIO, tty: bool):
        self.tok, self.out, self.tty = tok, out, tty
        self.prev: list[int] | None = None
        self.rows = 0
        self.step = 0

    def cell(self, t: int) -> str:
        return "░" if t == self.tok.mask_id else printable(self.tok.decode([t], skip_special=False)
                                                            if t not in self.tok.special_ids
                                                            else self.tok.sp.id_to_piece(t))

    def draw(self, canvas: list[int]) -> None:
        self.step += 1
        changed = {i: kind for i, _, kind in canvas_changes(self.prev, canvas, self.tok.mask_id)}
        self.prev = list(canvas)
        if not self.tty:
            self.out.write(f"[step {self.step:3d}] " + "".join(self.cell(t) for t in canvas).replace("\n", "⏎")
                           + "\n")
            self.out.flush()
            return
        colour = {"fill": "\x1b[30;43m", "edit": "\x1b[30;41m", "remask": "\x1b[2m"}
        plain = "".join(self.cell(t) for t in canvas).replace("\n", "⏎")
        text = "".join(f"{colour[changed[i]]}{self.cell(t).replace(chr(10), '⏎')}\x1b[0m" if i in changed
                       else self.cell(t).replace("\n", "⏎") for i, t in enumerate(canvas))
        self.clear()
        line = f"[step {self.step}] "
        self.out.write(line + text + "\n")
        width = max(shutil.get_terminal_size((80, 24)).columns, 10)
        self.rows = -(-display_width(line + plain) // width) or 1
        self.out.flush()

    def clear(self) -> None:
        if self.tty and self.rows:
            self.out.write(f"\x1b[{self.rows}F\x1b[J")
            self.rows = 0


class ChatREPL:
    """The read-eval-print loop around a :class:`ChatSession`.

    Args:
        session: The conversation.
        show_denoising: Draw the live canvas (paradigms with a denoising canvas) instead of streaming text.
        inp: Where lines come from (``sys.stdin``).
        out: Where everything is written (``sys.stdout``).
    """

    def __init__(self, session: ChatSession, show_denoising: bool = False, inp: TextIO = sys.stdin,
                 out: TextIO = sys.stdout):
        self.s, self.inp, self.out = session, inp, out
        self.tty = out.isatty()
        self.interactive = inp.isatty()
        self.show_denoising = show_denoising and session.iface.supports_trace
        self.stop = threading.Event()
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass

    def say(self, text: str) -> None:
        self.out.write((f"\x1b[2m{text}\x1b[0m" if self.tty else text) + "\n")
        self.out.flush()

    def banner(self) -> None:
        s, iface = self.s, self.s.iface
        params = sum(p.numel() for p in iface.model.parameters()) / 1e6
        self.say(f"nanollada chat: {getattr(s.loaded, 'path', '')} ({iface.name}, {params:.2f}M parameters, "
                 f"max_seq_len={s.max_seq_len})")
        if s.is_chat:
            self.say("chat checkpoint: the conversation is rendered with the chat template"
                     + (f"; system prompt: {s.system!r}" if s.system else ""))
        else:
            self.say("pretraining checkpoint (no chat template): each message is continued as plain text, "
                     "without history")
        if self.show_denoising:
            self.say("--show_denoising: the canvas is drawn at every denoising step")
        elif iface.supports_trace:
            self.say("answers appear block by block as the canvas settles (--show_denoising true shows the canvas)")
        self.say("settings: " + self.settings_line() + "\n/help lists the commands; Ctrl-C stops an answer, "
                 "Ctrl-D or /quit leaves.")

    def settings_line(self) -> str:
        """Every setting in effect that this paradigm's decoder reads, resolved (``streaming.applicable_settings``:
        with editing on, its tau_mask / tau_edit instead of the strategy and threshold), as key=value."""
        shown = applicable_settings(self.s.iface, self.s.resolved())
        return " ".join(f"{k}={json.dumps(v)}" for k, v in shown.items())

    # ------------------------------------------------------------------ input
    def read(self) -> str | None:
        """One message (lines ending in a backslash continue); None at end of input."""
        lines = []
        while True:
            if self.interactive:
                try:
                    line = input("... " if lines else "you> ")
                except EOFError:
                    return None
            else:
                line = self.inp.readline()
                if not line:
                    return "\n".join(lines) if lines else None
                line = line.rstrip("\n")
                self.out.write(("... " if lines else "you> ") + line + "\n")
            if line.endswith("\\"):
                lines.append(line[:-1])
                continue
            lines.append(line)
            return "\n".join(lines)

    # ------------------------------------------------------------------ commands
    def command(self, line: str) -> bool:
        """Run a /command; False when the REPL should end."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.s
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            s.reset()
            self.say("conversation cleared")
        elif name == "/settings":
            self.say(self.settings_line())
        elif name == "/system":
            if not s.is_chat:
                self.say("a pretraining checkpoint has no chat template, so no system prompt")
            else:
                s.system = arg or None
                self.say(f"system prompt: {arg!r}" if arg else "system prompt removed")
        elif name == "/set":
            self.set(arg)
        elif name == "/save":
            self.save(arg)
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def set(self, arg: str) -> None:
        import yaml
        if not arg:
            self.say("usage: /set key=value [key=value ...]; " + self.settings_line())
            return
        changes = {}
        for pair in arg.split():
            key, eq, value = pair.partition("=")
            if not eq or not key:
                self.say(f"/set: expected key=value, got {pair!r}")
                return
            try:
                changes[key] = yaml.safe_load(value) if value else None
            except yaml.YAMLError:
                changes[key] = value
        try:
            new = self.s.settings.updated(**changes)
            new.resolve(self.s.iface.default_generation())
        except (ValueError, TypeError) as e:
            self.say(f"/set: {e}")
            return
        self.s.settings = new
        self.say("settings: " + self.settings_line())

    def save(self, path: str) -> None:
        if not path:
            self.say("usage: /save FILE.jsonl")
            return
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(self.s.record(), ensure_ascii=False) + "\n")
        except OSError as e:
            self.say(f"/save: {e}")
            return
        self.say(f"appended the conversation ({len(self.s.history) // 2} turn(s)) to {path}")

    # ------------------------------------------------------------------ one answer
    def respond(self, text: str) -> None:
        s = self.s
        try:
            prepared = s.prepare(text)
        except ValueError as e:
            self.say(f"[error] {e}")
            return
        stream = TextStream.for_answer(s.iface, prepared[1], len(prepared[0]))
        view = CanvasView(s.tok, self.out, self.tty) if self.show_denoising else None
        for note in prepared[2]:  # history dropped, answer capped: said before the answer
            self.say(f"[note] {note}")
        head = "bot> " if s.is_chat else "bot> …"
        if view is None:
            self.out.write(head)
            self.out.flush()
        self.stop.clear()

        def on_step(tokens: list[int]) -> bool:
            delta = stream.update(tokens)
            if view is not None:
                view.draw(tokens)
            elif delta:
                self.out.write(printable(delta))
                self.out.flush()
            return self.stop.is_set()

        previous = signal.getsignal(signal.SIGINT)

        def interrupt(signum, frame):
            if self.stop.is_set():  # a second Ctrl-C while a forward is still running
                raise KeyboardInterrupt
            self.stop.set()

        signal.signal(signal.SIGINT, interrupt)
        start = time.perf_counter()
        try:
            rec, _ = s.answer(text, on_step, prepared)
        except KeyboardInterrupt:
            self.out.write("\n")
            self.say("[interrupted]")
            return
        except ValueError as e:
            self.out.write("\n")
            self.say(f"[error] {e}")
            return
        finally:
            signal.signal(signal.SIGINT, previous)
        stopped = bool(rec.get("stopped_early"))
        tail = "" if stopped else stream.finish(rec["completion_ids"])
        answer = stream.emitted
        if view is not None:
            view.clear()
            self.out.write(head + printable(answer))
        else:
            self.out.write(printable(tail))
        self.out.write("\n")
        for note in rec.get("notes", [])[len(prepared[2]):]:
            self.say(f"[note] {note}")
        s.commit(text, answer, rec)
        wall = time.perf_counter() - start
        n = sum(t != s.tok.mask_id for t in rec["completion_ids"])  # a stopped canvas: the tokens committed
        self.say(("[stopped] " if stopped else "") +
                 f"[{n} tokens, {rec['forwards']} forwards, {n / max(rec['forwards'], 1):.2f} tokens/forward, "
                 f"{n / max(rec['seconds'], 1e-9):.1f} tok/s, {wall:.2f}s"
                 + (f", {rec['edits']} edits" if "edits" in rec else "") + "]")

    def run(self) -> None:
        self.banner()
        while True:
            try:
                line = self.read()
            except KeyboardInterrupt:
                self.out.write("\n")
                self.say("(Ctrl-C stops an answer; Ctrl-D or /quit leaves)")
                continue
            if line is None:
                self.out.write("\n")
                return
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line.strip()):
                    return
                continue
            self.respond(line)
