"""Tokenizer: exact round trips, fixed special ids, the chat template's loss mask, training and its CLI."""

import pytest

from conftest import english_lines, write_jsonl
from nanollada.tokenizer import SPECIAL_PIECES, Tokenizer, train_tokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?",
    "chinese": "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "emoji": "Training done 🎉🚀 — café naïve 👩‍👩‍👧 ✓",
    "layout": "def f(x):\n    if x:\n\t\treturn [1,  2,   3]\n\n\n    return None  \n",
    "spaces": "  leading and trailing  ",
    "mixed": "混合 text 与 code: `print('你好')`\r\n第二行",
}


def check_ids(tok: Tokenizer):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert (tok.mask_id, tok.im_start_id, tok.im_end_id) == (4, 5, 6)
    assert [tok.sp.id_to_piece(i) for i in (4, 5, 6)] == list(SPECIAL_PIECES)
    assert tok.special_ids == {0, 2, 3, 4, 5, 6}


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip(shipped_tokenizer, name):
    text = TEXTS[name]
    ids = shipped_tokenizer.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert shipped_tokenizer.unk_id not in ids  # byte fallback: nothing is unknown
    assert shipped_tokenizer.decode(ids) == text
    assert shipped_tokenizer.encode_batch([text, "x"]) == [ids, shipped_tokenizer.encode("x")]


def test_pieces_concatenate(shipped_tokenizer):
    """No dummy prefix: encoding two halves separately gives the same text as the whole."""
    a, b = "hello", " world\n  indented"
    assert shipped_tokenizer.decode(shipped_tokenizer.encode(a) + shipped_tokenizer.encode(b)) == a + b
    assert shipped_tokenizer.decode(shipped_tokenizer.encode("\n")) == "\n"


def test_special_ids(shipped_tokenizer):
    check_ids(shipped_tokenizer)
    assert shipped_tokenizer.vocab_size == 8192
    assert shipped_tokenizer.decode([2, 5] + shipped_tokenizer.encode("hi") + [6, 3, 0]) == "hi"
    assert shipped_tokenizer.decode([6], skip_special=False) == "<|im_end|>"


def test_directory_path_and_default(tmp_path, shipped_tokenizer):
    (tmp_path / "tokenizer.model").write_bytes(shipped_tokenizer.model_bytes)
    assert Tokenizer(tmp_path).fingerprint() == shipped_tokenizer.fingerprint() == Tokenizer().fingerprint()


def masked_spans(ids, mask):
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "写一句诗"},
     {"role": "assistant", "content": "床前明月光。\n疑是地上霜。"},
     {"role": "user", "content": "And an emoji?"},
     {"role": "assistant", "content": "🌙 ok"}],
]


@pytest.mark.parametrize("chat", CHATS, ids=["one_turn", "multi_turn_system"])
def test_render_chat_loss_mask(shipped_tokenizer, chat):
    tok = shipped_tokenizer
    ids, mask = tok.render_chat(chat)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id and mask[0] is False
    answers = [m["content"] for m in chat if m["role"] == "assistant"]
    spans = masked_spans(ids, mask)
    assert len(spans) == len(answers)
    for span, answer in zip(spans, answers):
        assert span[-1] == tok.im_end_id and tok.im_end_id not in span[:-1]
        assert span[:-1] == tok.encode(answer)
        assert tok.decode(span) == answer
    # Everything unmasked is template or non-assistant text; the whole renders as the documented ChatML.
    unmasked = [i for i, m in zip(ids, mask) if not m]
    assert tok.im_end_id in unmasked or all(m["role"] == "assistant" for m in chat)
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
    assert tok.sp.decode(ids[1:]) == expected
    for m in chat:
        if m["role"] != "assistant":
            assert m["content"] not in tok.decode([i for i, k in zip(ids, mask) if k])


def test_add_generation_prompt(shipped_tokenizer):
    tok = shipped_tokenizer
    chat = CHATS[0][:1]
    base, base_mask = tok.render_chat(chat)
    ids, mask = tok.render_chat(chat, add_generation_prompt=True)
    header = [tok.im_start_id] + tok.encode("assistant\n")
    assert ids == base + header and mask == base_mask + [False] * len(header)
    assert not any(mask)
    assert tok.chat_prompt(chat[0]["content"]) == ids
    assert tok.sp.decode(ids[1:]).endswith("<|im_end|>\n<|im_start|>assistant\n")


SPECIAL_TOKEN_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4, "im_start": 5, "im_end": 6}


@pytest.mark.parametrize("name", sorted(SPECIAL_TOKEN_IDS))
def test_special_pieces_in_user_text_are_plain_text(shipped_tokenizer, name):
    """Typing a special piece (``<|mask|>``, ``<|im_end|>``, ``</s>``...) in a prompt or a training text gives
    ordinary text ids, never the special id; the text still round-trips exactly."""
    tok = shipped_tokenizer
    piece = tok.sp.id_to_piece(SPECIAL_TOKEN_IDS[name])
    forbidden = tok.special_ids | {tok.unk_id}
    for text in (piece, f"say {piece} now", f"{piece}{piece}x{piece}", f"<|{piece}|>", f"{piece}\n{piece[:-1]}"):
        ids = tok.encode(text)
        assert not set(ids) & forbidden, (text, ids)
        assert tok.decode(ids) == tok.decode(ids, skip_special=False) == text
        assert tok.encode_batch(["plain", text]) == [tok.encode("plain"), ids]
    text = f"what does {piece} mean?"
    prompt = tok.chat_prompt(text)  # plain prompts and the chat template share the rule
    assert [i for i in prompt if i in forbidden] == [tok.bos_id, tok.im_start_id, tok.im_end_id, tok.im_start_id]
    assert tok.sp.decode(prompt[1:]) == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    chat = [{"role": "system", "content": piece}, {"role": "user", "content": text},
            {"role": "assistant", "content": f"{piece} is a token"}]
    ids, mask = tok.render_chat(chat)  # what the SFT token cache stores
    assert [i for i in ids if i in forbidden] == [tok.bos_id] + [tok.im_start_id, tok.im_end_id] * 3
    assert tok.decode(masked_spans(ids, mask)[0]) == chat[2]["content"]


def test_text_without_special_pieces_encodes_as_sentencepiece_does(shipped_tokenizer):
    """The escaping only touches special pieces, so token ids of ordinary data (and its caches) do not change."""
    for text in TEXTS.values():
        assert shipped_tokenizer.encode(text) == shipped_tokenizer.sp.encode(text)
    near_misses = "<| im_end |> <s > <|mask"
    assert shipped_tokenizer.encode(near_misses) == shipped_tokenizer.sp.encode(near_misses)


@pytest.mark.parametrize("bad", [{"role": "bot", "content": "x"}, {"role": "user", "content": 3}, {"content": "x"}])
def test_render_chat_rejects_bad_messages(shipped_tokenizer, bad):
    with pytest.raises(ValueError, match="bad chat message"):
        shipped_tokenizer.render_chat([bad])


def test_train_tokenizer_on_jsonl_and_gz(tiny_tokenizer_path, tiny_tokenizer):
    assert tiny_tokenizer_path.name == "tokenizer.model" and tiny_tokenizer_path.is_file()
    tok = tiny_tokenizer
    check_ids(tok)
    assert tok.vocab_size == 400
    for text in ["the lazy dog learns", *TEXTS.values()]:  # unseen scripts still round-trip (byte fallback)
        ids = tok.encode(text)
        assert tok.unk_id not in ids and tok.decode(ids) == text
    # Trained on the corpus: its words compress (BPE merges learnt), unlike bytes.
    line = english_lines(1, seed=99)[0]
    assert len(tok.encode(line)) < 0.6 * len(line.encode())
    ids, mask = tok.render_chat(CHATS[0])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == CHATS[0][1]["content"]


def test_train_tokenizer_reads_sft_gz(tmp_path):
    """The texts of SFT records (every message) are read, here from a .jsonl.gz file."""
    lines = english_lines(120, seed=3)
    sft = [{"conversations": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}
           for a, b in zip(lines[::2], lines[1::2])]
    path = train_tokenizer([str(write_jsonl(tmp_path / "s.jsonl.gz", sft))], tmp_path / "gz", vocab_size=400)
    tok = Tokenizer(path)
    check_ids(tok)
    assert tok.vocab_size == 400
    assert len(tok.encode(lines[0])) < 0.6 * len(lines[0].encode())  # merges were learnt from the conversations


def test_train_tokenizer_errors(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer([str(empty)], tmp_path / "out", vocab_size=300)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "[1, 2]"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        train_tokenizer([str(bad)], tmp_path / "out", vocab_size=300)


def test_tokenizer_train_cli(tmp_path, cli):
    lines = english_lines(150, seed=5)
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in lines[:75]])
    b = write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in lines[75:]])
    out = tmp_path / "tok"
    r = cli(["tokenizer", "train", "--input", a, b, "--vocab-size", "300", "--output", out], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "vocab 300" in r.stdout and "mask 4, im_start 5, im_end 6" in r.stdout
    tok = Tokenizer(out)
    check_ids(tok)
    assert tok.vocab_size == 300 and tok.decode(tok.encode(lines[0])) == lines[0]


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer model not found: .*nope\.model"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path)  # a directory without tokenizer.model
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(junk)
