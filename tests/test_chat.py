"""`nanollada chat`: piped stdin and a real pseudo-terminal (Ctrl-C mid-answer), history rendering and truncation,
/set /reset /save, pretraining checkpoints, the diffusion canvas; `nanollada.streaming` text settling."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from conftest import cli_env
from serve_fixtures import MAX_SEQ_LEN, trained


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return trained(tmp_path_factory)


def chat(args, stdin: str, cwd, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanollada", "chat", *map(str, args)], input=stdin, text=True,
                          capture_output=True, cwd=cwd, env=cli_env(1), timeout=timeout)


def test_piped_multi_turn_chat_with_commands(ckpts, tmp_path):
    saved = tmp_path / "conv.jsonl"
    script = ("Name three colours.\n/set temperature=0.5 bogus=1\n/set top_p=abc\n/set greedy=true\n"
              "And three animals?\n/settings\n/save " + str(saved) + "\n/reset\n/unknown\nHello again\n/quit\n"
              "never read\n")
    r = chat(["--ckpt", ckpts["ar"], "--max_new_tokens", "12", "--system", "Be brief."], script, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "chat checkpoint: the conversation is rendered with the chat template; system prompt: 'Be brief.'" in out
    assert "temperature=0.7 top_k=null top_p=0.9 repetition_penalty=1.1" in out  # the AR defaults at start
    assert out.count("bot> ") == 3 and "never read" not in out
    assert "unknown generation setting 'bogus'" in out and "top_p='abc' has the wrong type" in out
    assert re.search(r"settings: .*temperature=0\.0 .*greedy=true", out)  # greedy resolves to temperature 0
    assert "conversation cleared" in out and "unknown command /unknown" in out
    assert len(re.findall(r"\[\d+ tokens, \d+ forwards, [\d.]+ tokens/forward, [\d.]+ tok/s, [\d.]+s\]", out)) == 3
    rec = json.loads(saved.read_text(encoding="utf-8"))
    assert [m["role"] for m in rec["conversations"]] == ["system", "user", "assistant", "user", "assistant"]
    assert rec["conversations"][3]["content"] == "And three animals?" and rec["mode"] == "chat"
    assert rec["settings"]["greedy"] is True and len(rec["stats"]) == 2
    # the answers written on the terminal are the ones saved
    for m in rec["conversations"][2::2]:
        assert f"bot> {m['content']}" in out


def test_history_is_rendered_with_the_template_and_cut_from_the_oldest_turn(ckpts):
    from nanollada.chat import ChatSession
    from nanollada.generate import GenerationSettings
    from nanollada.loading import load_checkpoint
    loaded = load_checkpoint(str(ckpts["ar"]))
    tok = loaded.tokenizer
    s = ChatSession(loaded, GenerationSettings(max_new_tokens=64, greedy=True), system="sys")
    rec, _ = s.answer("first question")
    s.commit("first question", rec["completion"], rec)
    ids, notes = s.render("second question")
    want = tok.render_chat([{"role": "system", "content": "sys"}, {"role": "user", "content": "first question"},
                            {"role": "assistant", "content": rec["completion"]},
                            {"role": "user", "content": "second question"}], add_generation_prompt=True)[0]
    assert ids == want and notes == []
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 3)  # 42 tokens a message
    for i in range(4):
        s.commit(f"{i} {long}", long, {"tokens": 1})
    ids, notes = s.render("last")
    assert len(ids) + 64 <= MAX_SEQ_LEN
    assert notes and "history: the oldest" in notes[0] and "max_seq_len=256" in notes[0]
    kept = s.history[s.window:]
    assert s.window > 0 and s.window % 2 == 0 and kept[0]["role"] == "user"
    assert ids == tok.render_chat([{"role": "system", "content": "sys"}, *kept, {"role": "user", "content": "last"}],
                                  add_generation_prompt=True)[0]
    assert s.render("last")[1] == []  # said once, when it happens
    rec, settings = s.answer("last")
    assert rec["prompt_tokens"] == len(ids) and settings.max_new_tokens == 64
    rec, settings = s.answer("word " * 200)  # leaves less than 64 positions: the answer is capped, and said so
    assert any("room for only" in n for n in rec["notes"]) and settings.max_new_tokens < 64


def repl(ckpt, args: list[str], stdin: str, show_denoising: bool = False) -> str:
    """Run the chat REPL in this process on piped text (what `nanollada chat` runs after parsing its flags)."""
    from nanollada.chat import ChatREPL, ChatSession
    from nanollada.commands import _settings, _settings_parser
    from nanollada.loading import load_checkpoint
    cfg = _settings_parser("t", "", prompts=False).parse_args(args)
    out = io.StringIO()
    ChatREPL(ChatSession(load_checkpoint(str(ckpt)), _settings(cfg)), show_denoising=show_denoising,
             inp=io.StringIO(stdin), out=out).run()
    return out.getvalue()


def test_pretraining_checkpoint_gets_plain_continuation(ckpts, tmp_path):
    saved = tmp_path / "c.jsonl"
    out = repl(ckpts["pre"], ["--max_new_tokens", "8", "--seed", "3"],
               f"Once upon a time\nThe dog\n/system hi\n/save {saved}\n")
    assert "pretraining checkpoint (no chat template): each message is continued as plain text" in out
    assert "no system prompt" in out and out.count("bot> …") == 2
    rec = json.loads(saved.read_text())
    assert rec["mode"] == "continuation" and len(rec["conversations"]) == 4
    from nanollada.generate import GenerationSettings, generate_text
    from nanollada.loading import load_checkpoint
    ref = generate_text(load_checkpoint(str(ckpts["pre"])), "The dog", GenerationSettings(max_new_tokens=8, seed=3))
    assert rec["conversations"][3]["content"] == ref["completion"]  # no history: the same as predict


def test_diffusion_chat_streams_blocks_and_shows_the_canvas(ckpts):
    out = repl(ckpts["dm"], ["--max_new_tokens", "16", "--block_length", "8"], "Hi\n")
    assert "answers appear block by block" in out and 'strategy="threshold"' in out
    out = repl(ckpts["dm"], ["--max_new_tokens", "16", "--block_length", "8", "--strategy", "low_confidence"],
               "Hi\n", show_denoising=True)
    steps = re.findall(r"^\[step +(\d+)\] (.*)$", out, re.M)
    assert steps and steps[0][1].count("░") >= 8  # the first step: the second block still all masks
    counts = [s.count("░") for _, s in steps]
    assert counts == sorted(counts, reverse=True) and len(steps) <= 16
    forwards = int(re.search(r"\[\d+ tokens, (\d+) forwards", out).group(1))
    assert forwards == len(steps)


def test_text_stream_settles_blocks_and_stop_strings(shipped_tokenizer):
    from nanollada.streaming import TextStream, canvas_changes
    tok = shipped_tokenizer
    M = tok.mask_id
    a, b = tok.encode("Hello world"), tok.encode(" and more")
    s = TextStream(tok, stop_ids={tok.eos_id}, block_length=len(a))
    assert s.update(a[:1] + [M] * (len(a) - 1) + [M] * len(b)) == ""  # block one still has masks
    assert s.update(a + [M] * len(b)) == ""  # complete, but still the block being decoded (edits may come)
    assert s.update(a + b[:1] + [M] * (len(b) - 1)) == "Hello world"  # decoding moved on: block one is final
    assert s.update(a + b[:-1] + [M]) == "" and s.finish(a + b) == " and more" and s.reason is None
    s = TextStream(tok, block_length=len(a))
    s.update(a + b[:1] + [M] * (len(b) - 1))
    assert s.finish(b + b) == "" and s.revised and s.text == tok.decode(b + b)  # a rewrite: the final text wins
    s = TextStream(tok, stop_ids={tok.eos_id}, stop_strings=("wor",))
    assert s.update(tok.encode("Hello w")) == "Hello "  # "w" could start the stop string: held back
    assert s.update(tok.encode("Hello world")) == "" and s.stopped and s.text == "Hello "
    s = TextStream(tok, stop_ids={tok.eos_id}, limit=2)
    assert s.update(a + [tok.eos_id]) == tok.decode(a[:2]) and s.reason == "length" and s.token_count() == 2
    s = TextStream(tok, stop_ids={tok.eos_id})
    assert s.finish(a + [tok.eos_id] + b) == "Hello world" and s.reason == "stop"
    assert canvas_changes([M, 5, 6], [7, 5, M], M) == [(0, 7, "fill"), (2, None, "remask")]
    assert canvas_changes([M, 5], [M, 9], M) == [(1, 9, "edit")]


class PtyReader:
    """What a pseudo-terminal printed, consumed pattern by pattern."""

    def __init__(self, fd: int):
        self.fd, self.text, self.pos = fd, "", 0

    def expect(self, pattern: str, timeout: float = 120) -> str:
        """Read until ``pattern`` (regex) appears after the last match; returns the text up to its end."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.text, self.pos)
            if m:
                seen, self.pos = self.text[self.pos:m.end()], m.end()
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen; got: {self.text[self.pos:][-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                try:
                    self.text += os.read(self.fd, 65536).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    raise AssertionError(f"{pattern!r} not seen before the end: {self.text[-2000:]!r}")


def test_ctrl_c_in_a_terminal_stops_the_answer_and_keeps_the_repl(ckpts, tmp_path):
    """A real pseudo-terminal: Ctrl-C (the terminal's ^C -> SIGINT) while the canvas is being denoised stops the
    answer after a few of its 200 steps; Ctrl-C at the prompt does not leave; the next message is answered."""
    args = [sys.executable, "-m", "nanollada", "chat", "--ckpt", str(ckpts["dm"]), "--max_new_tokens", "200",
            "--block_length", "200", "--strategy", "low_confidence", "--use_prefix_cache", "false"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        os.chdir(tmp_path)
        os.execve(sys.executable, args, cli_env(1))
    term = PtyReader(fd)
    try:
        term.expect(r"you> ")
        os.write(fd, "Tell me a long story.\r".encode())
        term.expect(r"bot> ")
        time.sleep(0.3)
        os.write(fd, b"\x03")  # Ctrl-C mid-answer
        stats = term.expect(r"\[stopped\] \[\d+ tokens, \d+ forwards.*?\]")
        tokens, forwards = map(int, re.search(r"\[stopped\] \[(\d+) tokens, (\d+) forwards", stats).groups())
        assert 1 <= forwards < 200 and tokens < 200
        term.expect(r"you> ")
        for attempt in range(3):  # at the prompt: a hint, not an exit
            time.sleep(0.5)  # a ^C that lands while readline is still drawing the prompt waits for the next key
            os.write(fd, b"\x03")
            try:
                term.expect(r"Ctrl-D or /quit leaves", timeout=5)
                break
            except AssertionError:
                if attempt == 2:
                    raise
        os.write(fd, b"/set max_new_tokens=8 block_length=8\rHi\r")
        term.expect(r"bot> .*\n.*\[\d+ tokens, \d+ forwards")
        os.write(fd, b"/quit\r")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0, term.text[-3000:]
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


def test_settings_show_every_setting_of_the_paradigm_and_the_editing_thresholds(ckpts):
    """/settings lists what the paradigm's decoder reads, resolved: AR its sampler, diffusion its strategy, block,
    caches, guidance and eos rules, block diffusion also `editing`, and with editing on the preset's tau_mask /
    tau_edit instead of the strategy and threshold (the threshold default is read from the paradigm)."""
    from nanollada.chat import ChatREPL, ChatSession
    from nanollada.generate import EDITING_PRESETS, GenerationSettings
    from nanollada.loading import load_checkpoint

    def shown(name, **settings):
        loaded = load_checkpoint(str(ckpts[name]))
        r = ChatREPL(ChatSession(loaded, GenerationSettings(**settings)), inp=io.StringIO(""), out=io.StringIO())
        line = r.settings_line()
        pairs = dict(p.split("=", 1) for p in line.split(" "))
        return r, pairs, GenerationSettings(**settings).resolve(loaded.interface.default_generation())

    _, ar, res = shown("ar")
    assert list(ar) == ["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "use_kv_cache",
                        "seed", "greedy"]
    assert (ar["temperature"], ar["top_p"], ar["top_k"]) == (json.dumps(res.temperature), json.dumps(res.top_p), "null")
    _, dm, res = shown("dm", cfg_scale=0.5)
    for key in ("strategy", "steps", "block_length", "threshold", "commit_top_k", "budget", "use_prefix_cache",
                "cfg_scale", "min_new_tokens", "eos_after_text", "seed", "greedy"):
        assert key in dm, key
    assert dm["cfg_scale"] == "0.5" and dm["threshold"] == json.dumps(res.threshold)
    assert not {"editing", "top_p", "repetition_penalty"} & set(dm)
    r, bd, res = shown("bd")
    assert bd["editing"] == '"off"' and bd["threshold"] == json.dumps(res.threshold)  # the paradigm's default
    assert bd["use_kv_cache"] == "true" and "use_prefix_cache" not in bd and bd["cfg_scale"] == "0.0"
    out = r.out
    for line in ("/set editing=speedy", "/settings", "/set editing=custom threshold=0.8 edit_threshold=0.6"):
        r.command(line)
    said = out.getvalue().splitlines()
    speedy = dict(p.split("=", 1) for p in said[1].split(" "))
    tau_mask, tau_edit = EDITING_PRESETS["speedy"]
    assert speedy["editing"] == '"speedy"'
    assert (speedy["tau_mask"], speedy["tau_edit"]) == (str(tau_mask), str(tau_edit))
    assert "threshold" not in speedy and "strategy" not in speedy  # the preset decides, not threshold
    assert {"max_post_edit_steps", "edit_penalty", "cfg_scale"} <= set(speedy)
    assert said[0] == "settings: " + said[1]  # /set shows the new settings too
    assert said[2].endswith('editing="custom" tau_mask=0.8 tau_edit=0.6 max_post_edit_steps=16 edit_penalty=0.0'
                            ' seed=0 greedy=false')


class Recorder(io.StringIO):
    """A terminal stand-in that remembers each write and whether an answer was being generated at the time."""

    def __init__(self):
        super().__init__()
        self.live, self.writes = False, []

    def write(self, text):
        if text:
            self.writes.append((text, self.live))
        return super().write(text)


def streamed_writes(ckpt, args: list[str], message: str) -> list[str]:
    """What the REPL wrote while the answer to ``message`` was being generated (the streamed text)."""
    from nanollada.chat import ChatREPL, ChatSession
    from nanollada.commands import _settings, _settings_parser
    from nanollada.loading import load_checkpoint
    session = ChatSession(load_checkpoint(str(ckpt)), _settings(_settings_parser("t", "", prompts=False)
                                                                  .parse_args(args)))
    out, answer = Recorder(), session.answer

    def generating(*a, **k):
        out.live = True
        try:
            return answer(*a, **k)
        finally:
            out.live = False

    session.answer = generating
    ChatREPL(session, inp=io.StringIO(message + "\n"), out=out).run()
    return [t for t, live in out.writes if live]


def test_chat_streams_ar_token_by_token_and_diffusion_block_by_block(ckpts):
    """The answer reaches the terminal while it is being generated: AR in many pieces (token by token), diffusion
    one piece per settled block before decoding ends (24 tokens in blocks of 8, no eos before the third block)."""
    ar = streamed_writes(ckpts["ar"], ["--max_new_tokens", "16", "--seed", "5"], "Name three colours.")
    assert len(ar) >= 5, ar
    for name in ("dm", "bd"):
        blocks = streamed_writes(ckpts[name], ["--max_new_tokens", "24", "--block_length", "8", "--seed", "5",
                                               "--min_new_tokens", "17"], "Name three colours.")
        assert 2 <= len(blocks) <= 3, (name, blocks)  # blocks 1 and 2 (3 when the last settles in a step)


def test_block_diffusion_chat_with_editing_through_piped_stdin(ckpts):
    """The chat REPL on a block-diffusion SFT checkpoint, fed piped (non-terminal) input as `nanollada chat ... <
    file` is (test_piped_multi_turn_chat_with_commands runs the command itself): /set editing=speedy shows the
    preset's thresholds, the answer streams, and its stats count the edits (temperature 1: sampled commits get
    rewritten; the threshold default is the paradigm's)."""
    from nanollada.generate import EDITING_PRESETS, GenerationSettings
    from nanollada.loading import load_checkpoint
    default = GenerationSettings().resolve(load_checkpoint(str(ckpts["bd"])).interface.default_generation())
    out = repl(ckpts["bd"], ["--max_new_tokens", "16"],
               "/settings\n/set editing=speedy temperature=1.0\nName three colours.\n/quit\n")
    assert "(block_diffusion," in out and "answers appear block by block" in out
    assert f'threshold={json.dumps(default.threshold)}' in out and 'editing="off"' in out
    tau_mask, tau_edit = EDITING_PRESETS["speedy"]
    assert "settings: max_new_tokens=16 temperature=1.0 block_length=8" in out
    assert f'editing="speedy" tau_mask={tau_mask} tau_edit={tau_edit}' in out
    m = re.search(r"bot> (.*)\n\[(\d+) tokens, (\d+) forwards, .*, (\d+) edits\]", out)
    assert m and int(m.group(4)) > 0 and 1 <= int(m.group(2)) <= 16, out[-2000:]


def test_text_stream_follows_block_diffusion_blocks_and_holds_the_last_block(shipped_tokenizer):
    """Block diffusion's blocks lie at absolute positions: after a 6-token prompt, blocks of 4 put the answer's first
    block at canvas [0, 2). Text settles only once decoding has moved past a block (an editing decoder may still
    rewrite the block it is on, full or not), and the last block only at the end."""
    from nanollada.streaming import TextStream
    tok = shipped_tokenizer
    M, w = tok.mask_id, tok.encode("one two three four five six seven eight nine ten")[:10]
    s = TextStream(tok, block_length=4, block_offset=2)
    assert s.update(w[:2] + [M] * 8) == ""  # the first block is complete but may still be edited
    assert s.update(w[:2] + [M, w[3]] + [M] * 6) == tok.decode(w[:2])  # decoding moved on to block [2, 6)
    assert s.update(w[:6] + [M] * 4) == ""
    assert s.update(w[:7] + [M] * 3) == tok.decode(w[:6])[len(tok.decode(w[:2])):]
    assert s.update(w) == ""  # no masks left, but the last block may still be edited
    before = s.text
    assert s.finish(w[:9] + [w[0]]) == tok.decode(w[:9] + [w[0]])[len(before):] and not s.revised  # edited: fine

    class Paradigm:
        supports_trace, absolute_blocks, tokenizer, block_size = True, True, tok, 4

        def stop_ids(self):
            return {tok.eos_id}

    from nanollada.generate import GenerationSettings
    made = TextStream.for_answer(Paradigm(), GenerationSettings(block_length=4), prompt_len=6)
    assert (made.block_length, made.block_offset, made.stop_ids) == (4, 2, {tok.eos_id})
    Paradigm.absolute_blocks = False  # masked diffusion: blocks start with the answer
    assert TextStream.for_answer(Paradigm(), GenerationSettings(block_length=4), 6).block_offset == 0
    Paradigm.supports_trace = False  # AR: every token is final
    assert TextStream.for_answer(Paradigm(), GenerationSettings(block_length=32), 6).block_length is None
