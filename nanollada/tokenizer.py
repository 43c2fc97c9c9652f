"""SentencePiece tokenizer shared by both paradigms: training, special ids and the chat template.

Fixed ids: pad=0, unk=1, bos=2, eos=3, then ``<|mask|>``, ``<|im_start|>``, ``<|im_end|>`` (4, 5, 6).
BPE with ``byte_fallback`` (no unknown characters), digits split, whitespace and newlines kept verbatim (identity
normalisation, no dummy prefix) so pieces concatenate exactly and poetry/code keep their layout.

Chat template (ChatML-like)::

    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n{content}<|im_end|>\\n

``render_chat`` returns token ids and a loss mask that is True on assistant content and its ``<|im_end|>`` only.

User text never yields a special id: ``encode`` (and so ``encode_batch``, ``render_chat`` and ``chat_prompt``) treats
a special piece typed in the text (``<|mask|>``, ``<|im_start|>``, ``<|im_end|>``; SentencePiece would match these
user-defined symbols anywhere) as plain characters. Only the template inserts special ids. Text without such pieces
encodes exactly as SentencePiece does.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

SPECIAL_PIECES = ("<|mask|>", "<|im_start|>", "<|im_end|>")
DEFAULT_MODEL = Path(__file__).parent / "assets" / "tokenizer.model"
ROLES = ("system", "user", "assistant")
# Data kinds rendered with the chat template (``LMDataModule.kind``): a checkpoint trained on one is a chat model.
CHAT_KINDS = ("sft", "preference")


def record_texts(record: dict) -> list[str]:
    """The raw texts of a pretrain ({"text"}) or SFT ({"conversations"}) record."""
    if "text" in record:
        return [record["text"]]
    return [m["content"] for m in record.get("conversations", [])]


class Tokenizer:
    """A trained SentencePiece model plus the project's special ids and chat template.

    Args:
        model_path: Path to a ``.model`` file (or a directory holding ``tokenizer.model``); default: the shipped one.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, model_bytes: bytes | None = None):
        if model_bytes is None:
            path = Path(model_path) if model_path else DEFAULT_MODEL
            if path.is_dir():
                path = path / "tokenizer.model"
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer model not found: {path} (train one: `nanollada tokenizer train`)")
            model_bytes = path.read_bytes()
        else:
            path = Path("<embedded>")
        self.path, self.model_bytes = path, model_bytes
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError as e:
            raise ValueError(f"{path} is not a SentencePiece model ({e})") from None
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (
            self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        self.mask_id, self.im_start_id, self.im_end_id = (self.sp.piece_to_id(p) for p in SPECIAL_PIECES)
        if min(self.pad_id, self.bos_id, self.eos_id) < 0 or self.unk_id in (self.mask_id, self.im_end_id):
            raise ValueError(f"{path} lacks the special pieces of a nanollada tokenizer {SPECIAL_PIECES}")
        self.special_ids = frozenset({self.pad_id, self.bos_id, self.eos_id, self.mask_id, self.im_start_id,
                                      self.im_end_id})
        # Special pieces that SentencePiece matches inside raw text (its user-defined symbols; control pieces such as
        # </s> are never matched), each with the ids of the same characters as plain text (cut after the first
        # character, so the symbol no longer matches).
        reserved = self.special_ids | {self.unk_id}
        self._plain_pieces: dict[str, list[int]] = {}
        for i in sorted(reserved):
            piece = self.sp.id_to_piece(i)
            if set(self.sp.encode(piece)) & reserved:
                plain = self.sp.encode(piece[:1]) + self.sp.encode(piece[1:])
                if set(plain) & reserved:  # cannot happen with nanollada's pieces; per character as a fallback
                    plain = [j for ch in piece for j in self.sp.encode(ch)]
                self._plain_pieces[piece] = plain
        self._special_re = re.compile("|".join(re.escape(p) for p in sorted(self._plain_pieces, key=len,
                                                                               reverse=True))) \
            if self._plain_pieces else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def fingerprint(self) -> str:
        """Content hash of the model file: keys token caches and guards against vocabulary mismatches."""
        return hashlib.sha1(self.model_bytes).hexdigest()[:16]

    def _has_special(self, text: str) -> bool:
        return self._special_re is not None and self._special_re.search(text) is not None

    def _encode_escaped(self, text: str) -> list[int]:
        ids, pos = [], 0
        for m in self._special_re.finditer(text):
            ids += self.sp.encode(text[pos:m.start()]) + self._plain_pieces[m.group()]
            pos = m.end()
        return ids + self.sp.encode(text[pos:])

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, without bos/eos. Special pieces in the text are encoded as plain characters."""
        return self._encode_escaped(text) if self._has_special(text) else self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of every text (one SentencePiece call for the texts without special pieces)."""
        texts = list(texts)
        out = self.sp.encode(texts, num_threads=1)
        for i, t in enumerate(texts):
            if self._has_special(t):
                out[i] = self._encode_escaped(t)
        return out

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.sp.decode(ids)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Render ``[{"role", "content"}, ...]`` with the chat template, prefixed by bos.

        Returns (ids, loss_mask): the mask is True on assistant content and that turn's ``<|im_end|>``.
        With ``add_generation_prompt`` an open ``<|im_start|>assistant\\n`` header is appended (for sampling).
        """
        ids, mask = [self.bos_id], [False]
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(f"bad chat message {m!r}: need role in {ROLES} and string content")
            header = [self.im_start_id] + self.encode(role + "\n")
            body = self.encode(content) + [self.im_end_id]
            trailer = self.encode("\n")
            ids += header + body + trailer
            is_answer = role == "assistant"
            mask += [False] * len(header) + [is_answer] * len(body) + [False] * len(trailer)
        if add_generation_prompt:
            header = [self.im_start_id] + self.encode("assistant\n")
            ids += header
            mask += [False] * len(header)
        return ids, mask

    def chat_prompt(self, user_text: str) -> list[int]:
        """Ids of a one-turn prompt ready for the assistant's answer."""
        return self.render_chat([{"role": "user", "content": user_text}], add_generation_prompt=True)[0]


def _training_texts(record: dict) -> list[str]:
    """The texts of a pretrain or SFT record; ValueError (the reason) for anything else."""
    if isinstance(record.get("text"), str):
        return [record["text"]]
    conv = record.get("conversations")
    if isinstance(conv, list) and conv and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                               for m in conv):
        return record_texts(record)
    raise ValueError('not a pretrain or SFT record: need a string "text" or a non-empty "conversations" list of '
                     '{"role", "content"} messages')


def iter_training_texts(files: Sequence[str], max_chars: int = 4000) -> Iterator[str]:
    """Texts of every record in the given jsonl(.gz) files, long texts cut into max_chars pieces.

    Read with ``nanollada.data.records.read_jsonl``: a bad line raises ``DataError("file:line: reason")``."""
    from nanollada.data.records import read_jsonl  # records imports this module (ROLES)
    for f in files:
        for _, texts in read_jsonl(str(f), _training_texts):
            for t in texts:
                for i in range(0, len(t), max_chars):
                    yield t[i:i + max_chars]


def train_tokenizer(files: Sequence[str], output_dir: str | os.PathLike, vocab_size: int = 8192,
                    max_sentences: int = 2_000_000, character_coverage: float = 0.9995, seed: int = 0,
                    split_digits: bool = True) -> Path:
    """Train a SentencePiece BPE model on the texts of ``files``; writes ``output_dir/tokenizer.model``.

    Texts beyond ``max_sentences`` are reservoir-sampled so any corpus size streams through in bounded memory.
    ``split_digits`` makes every digit its own piece (the default).
    """
    rng = random.Random(seed)
    sample: list[str] = []
    for n, text in enumerate(iter_training_texts(files)):
        if len(sample) < max_sentences:
            sample.append(text)
        elif (j := rng.randrange(n + 1)) < max_sentences:
            sample[j] = text
    if not sample:
        raise ValueError(f"no training text found in {list(files)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=split_digits, character_coverage=character_coverage,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=list(SPECIAL_PIECES) + ["\n"],
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>",
        eos_piece="</s>", max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1,
        train_extremely_large_corpus=False, minloglevel=2,
    )
    return out / "tokenizer.model"
