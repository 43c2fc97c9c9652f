"""Data pipeline: the shared validation rule, packing, collate masks, readers and their errors, caches, the sampler."""

import hashlib
import itertools
import json
import os

import numpy as np
import pytest
import torch

from conftest import english_lines, write_jsonl
from nanollada.data.cache import TokenCache, build_cache, cache_key
from nanollada.data.collate import IGNORE_INDEX, ARCollate, DiffusionCollate
from nanollada.data.datamodule import Conversations, MixtureSampler, PackedRows
from nanollada.data.records import SHARED_VAL_FRACTION, DataError, ReadStats, is_validation, iter_records

quiet = dict(log=lambda *a, **k: None)


# ---------------------------------------------------------------------------------------------- split rule
def test_shared_validation_rule():
    assert SHARED_VAL_FRACTION == 2 / 256
    keys = [f"record {i} 文本 {i * 7919}" for i in range(20000)] + ["", "a", "床前明月光", "🙂"]
    hits = 0
    for k in keys:
        rule = hashlib.sha1(k.encode("utf-8")).hexdigest()[:2] in ("00", "01")
        assert is_validation(k, SHARED_VAL_FRACTION) == rule, k
        hits += rule
    assert 100 < hits < 220  # ~0.78% of 20k: both branches exercised
    assert not any(is_validation(k, 0.0) for k in keys[:1000])


# ---------------------------------------------------------------------------------------------- packing
@pytest.fixture(scope="module")
def pretrain_texts():
    lines = english_lines(40, seed=7, words=1)
    # Very different lengths so rows hold several documents and documents span several rows.
    return [" ".join([w] * (1 + (i * 7) % 23)) + ("\n世界" if i % 5 == 0 else "") for i, w in enumerate(lines)]


def test_packed_rows_are_windows_of_the_document_stream(tmp_path, shipped_tokenizer, pretrain_texts):
    tok = shipped_tokenizer
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t, "source": "x"} for t in pretrain_texts])
    d = build_cache(str(path), "pretrain", tok, str(tmp_path / "cache"), val_fraction=0.0, **quiet)
    cache = TokenCache(d, "train")
    stream = [t for text in pretrain_texts for t in [tok.bos_id] + tok.encode(text) + [tok.eos_id]]
    assert cache.tokens.tolist() == stream
    starts = np.cumsum([0] + [len(tok.encode(t)) + 2 for t in pretrain_texts])
    assert cache.offsets.tolist() == starts.tolist()
    assert TokenCache(d, "val").n_docs == 0
    L = 16
    rows = PackedRows(cache, L)
    assert len(rows) == (len(stream) - 1) // L and len(rows) > 10
    boundaries_seen = 0
    for i in range(len(rows)):
        item = rows[i]
        tokens, docs = item["tokens"], item["doc_ids"]
        assert tokens.dtype == docs.dtype == torch.long and tokens.shape == docs.shape == (L + 1,)
        assert tokens.tolist() == stream[i * L:i * L + L + 1]  # consecutive windows, one token of overlap
        assert docs[0] == 0
        step = torch.diff(docs)
        assert ((step == 0) | (step == 1)).all()
        # A new document id exactly where a document starts (its bos), nowhere else.
        assert torch.equal(step == 1, tokens[1:] == tok.bos_id)
        expected = np.searchsorted(starts, np.arange(i * L, i * L + L + 1), side="right") - 1
        assert docs.tolist() == (expected - expected[0]).tolist()
        boundaries_seen += int(step.sum())
    assert boundaries_seen >= len(pretrain_texts) - 3


def test_ar_collate_pretrain_shifts_by_one(tmp_path, shipped_tokenizer, pretrain_texts):
    tok = shipped_tokenizer
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in pretrain_texts])
    rows = PackedRows(TokenCache(build_cache(str(path), "pretrain", tok, str(tmp_path), 0.0, **quiet), "train"), 12)
    items = [rows[i] for i in (0, 3, 5)]
    batch = ARCollate("pretrain", tok.pad_id, tok.eos_id, max_len=12)(items)
    assert batch["input_ids"].shape == batch["targets"].shape == batch["doc_ids"].shape == (3, 12)
    for b, it in enumerate(items):
        assert torch.equal(batch["input_ids"][b], it["tokens"][:-1])
        assert torch.equal(batch["targets"][b], it["tokens"][1:])
        assert torch.equal(batch["doc_ids"][b], it["doc_ids"][:-1])
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    assert (batch["targets"] != IGNORE_INDEX).all()
    dif = DiffusionCollate("pretrain", tok.pad_id, tok.eos_id, max_len=12)(items)
    assert torch.equal(dif["input_ids"], batch["input_ids"]) and dif["eligible"].all()
    assert torch.equal(dif["doc_ids"], batch["doc_ids"])


# ---------------------------------------------------------------------------------------------- SFT collate
SFT = [
    {"conversations": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! 👋"}]},
    {"conversations": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                       {"role": "user", "content": "写一句诗"},
                       {"role": "assistant", "content": "床前明月光，\n疑是地上霜。"}]},
    {"conversations": [{"role": "user", "content": "A much longer question " * 4},
                       {"role": "assistant", "content": "An answer that goes on for a while. " * 3}]},
]


@pytest.fixture(scope="module")
def sft_items(tmp_path_factory, shipped_tokenizer):
    d = tmp_path_factory.mktemp("sft")
    path = write_jsonl(d / "s.jsonl", SFT)
    cache = build_cache(str(path), "sft", shipped_tokenizer, str(d / "cache"), 0.0, **quiet)
    ds = Conversations(TokenCache(cache, "train"))
    assert len(ds) == len(SFT)
    return [ds[i] for i in range(len(ds))]


def test_sft_items_are_rendered_chats(sft_items, shipped_tokenizer):
    for item, rec in zip(sft_items, SFT):
        ids, mask = shipped_tokenizer.render_chat(rec["conversations"])
        assert item["tokens"].tolist() == ids and item["loss_mask"].tolist() == mask
        assert item["loss_mask"].dtype == torch.bool


def test_ar_collate_sft_targets_only_on_answers(sft_items, shipped_tokenizer):
    tok = shipped_tokenizer
    batch = ARCollate("sft", tok.pad_id, tok.eos_id, max_len=256)(sft_items)
    longest = max(len(it["tokens"]) for it in sft_items)
    assert batch["input_ids"].shape == (len(sft_items), longest - 1)
    for b, (item, rec) in enumerate(zip(sft_items, SFT)):
        n, tokens, mask = len(item["tokens"]), item["tokens"], item["loss_mask"]
        inp, tgt, docs = batch["input_ids"][b], batch["targets"][b], batch["doc_ids"][b]
        m = min(n, longest - 1)  # the longest row loses its last token (it is only a target)
        assert torch.equal(inp[:m], tokens[:m]) and (inp[n:] == tok.pad_id).all()
        assert (docs[:m] == 0).all() and (docs[n:] == -1).all()
        assert (tgt[n - 1:] == IGNORE_INDEX).all()  # nothing is learnt past the row's end
        taken = (tgt != IGNORE_INDEX).nonzero().flatten().tolist()
        assert taken == (mask[1:].nonzero().flatten()).tolist()  # shifted by one
        assert torch.equal(tgt[taken], tokens[1:][taken])
        answers = [m["content"] for m in rec["conversations"] if m["role"] == "assistant"]
        expected = [i for a in answers for i in tok.encode(a) + [tok.im_end_id]]
        assert tgt[taken].tolist() == expected
        assert tok.decode(tgt[taken].tolist()) == "".join(answers)


def expected_turn_rows(tok, conversations):
    """LLaDA appendix B: one (prompt, answer) row per assistant turn; the prompt holds every earlier turn."""
    rows = []
    for j, m in enumerate(conversations):
        if m["role"] == "assistant":
            prompt = tok.render_chat(conversations[:j], add_generation_prompt=True)[0]
            rows.append((prompt, tok.encode(m["content"]) + [tok.im_end_id]))
    return rows


def test_diffusion_collate_sft_one_row_per_answer_turn(sft_items, shipped_tokenizer):
    """Multi-turn dialogues become one single-turn row per assistant answer (LLaDA appendix B): earlier turns are the
    prompt, only that answer and the eos padding after it are eligible; the rows come from the same records."""
    tok = shipped_tokenizer
    rows = [r for rec in SFT for r in expected_turn_rows(tok, rec["conversations"])]
    assert len(rows) == 4  # SFT[1] has two answers
    longest = max(len(p) + len(a) for p, a in rows)
    batch = DiffusionCollate("sft", tok.pad_id, tok.eos_id, max_len=256)(sft_items)
    assert batch["input_ids"].shape == batch["eligible"].shape == (len(rows), longest + 1)
    for b, (prompt, answer) in enumerate(rows):
        inp, elig = batch["input_ids"][b], batch["eligible"][b]
        n = len(prompt) + len(answer)
        assert inp[:n].tolist() == prompt + answer and (inp[n:] == tok.eos_id).all() and len(inp[n:]) >= 1
        assert not elig[:len(prompt)].any() and elig[len(prompt):].all()
    assert (batch["doc_ids"] == 0).all()
    # Capped at max_len: the longest row then gets no eos padding, and nothing exceeds the cap.
    capped = DiffusionCollate("sft", tok.pad_id, tok.eos_id, max_len=longest)(sft_items)
    assert capped["input_ids"].shape[1] == longest


def test_diffusion_collate_sft_every_position_after_the_prompt_is_eligible(sft_items, shipped_tokenizer):
    """At inference everything after the prompt is masked, so in training no clean token may follow the answer: the
    template's "\\n" after the final <|im_end|> is not in the row, eos padding follows <|im_end|> at once."""
    tok = shipped_tokenizer
    batch = DiffusionCollate("sft", tok.pad_id, tok.eos_id, max_len=256)(sft_items)
    header = [tok.im_start_id] + tok.encode("assistant\n")
    for inp, elig in zip(batch["input_ids"].tolist(), batch["eligible"].tolist()):
        first = elig.index(True)
        assert all(elig[first:]) and not any(elig[:first])  # eligible = one suffix of the row
        assert inp[first - len(header):first] == header
        end = inp.index(tok.im_end_id, first)
        assert set(inp[end + 1:]) == {tok.eos_id}


def test_diffusion_collate_sft_truncated_rows(shipped_tokenizer):
    """A conversation cut before its first answer gives a row with nothing eligible (it adds zero loss); one cut
    inside an answer gives a row with that partial answer eligible and no eos after it."""
    tok = shipped_tokenizer
    ids, mask = tok.render_chat(SFT[2]["conversations"])
    cut = mask.index(True) + 3
    items = [{"tokens": torch.tensor(ids[:5]), "loss_mask": torch.tensor(mask[:5])},
             {"tokens": torch.tensor(ids[:cut]), "loss_mask": torch.tensor(mask[:cut])}]
    batch = DiffusionCollate("sft", tok.pad_id, tok.eos_id, max_len=cut)(items)
    assert batch["input_ids"].shape == (2, cut)
    assert not batch["eligible"][0].any()
    assert batch["input_ids"][1].tolist() == ids[:cut] and batch["eligible"][1].tolist() == mask[:cut]


# ---------------------------------------------------------------------------------------------- readers
def test_gz_reads_like_plain(tmp_path, shipped_tokenizer):
    recs = [{"text": t} for t in english_lines(30, seed=11)] + [{"text": "中文 🙂\n"}]
    plain = write_jsonl(tmp_path / "c.jsonl", recs)
    gz = write_jsonl(tmp_path / "c.jsonl.gz", recs)
    assert list(iter_records(str(plain), "pretrain")) == list(iter_records(str(gz), "pretrain"))
    assert [r for _, r in iter_records(str(gz), "pretrain")] == recs
    a = build_cache(str(plain), "pretrain", shipped_tokenizer, str(tmp_path / "cache"), 0.1, **quiet)
    b = build_cache(str(gz), "pretrain", shipped_tokenizer, str(tmp_path / "cache"), 0.1, **quiet)
    for split in ("train", "val"):
        ca, cb = TokenCache(a, split), TokenCache(b, split)
        assert ca.tokens.tolist() == cb.tokens.tolist() and ca.offsets.tolist() == cb.offsets.tolist()
    ma, mb = (json.loads((d / "meta.json").read_text()) for d in (a, b))
    assert ma["train"] == mb["train"] and ma["val"] == mb["val"] and ma["records"] == mb["records"] == 31


def test_split_follows_the_rule(tmp_path, shipped_tokenizer):
    texts = english_lines(60, seed=13)
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t in texts])
    d = build_cache(str(path), "pretrain", shipped_tokenizer, str(tmp_path), 0.3, **quiet)
    val = [t for t in texts if is_validation(t, 0.3)]
    assert 0 < len(val) < len(texts)
    for split, want in (("val", val), ("train", [t for t in texts if t not in val])):
        c = TokenCache(d, split)
        docs = [c.tokens[c.offsets[i] + 1:c.offsets[i + 1] - 1].tolist() for i in range(c.n_docs)]
        assert [shipped_tokenizer.decode(x) for x in docs] == want


BAD_LINES = {
    "bad_json": ("pretrain", b'{"text": "unterminated'),
    "not_object": ("pretrain", b'["text"]'),
    "missing_text": ("pretrain", b'{"txt": "typo"}'),
    "text_not_string": ("pretrain", b'{"text": 42}'),
    "non_utf8": ("pretrain", b'{"text": "caf\xe9 \xff"}'),
    "bad_role": ("sft", b'{"conversations": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}'),
    "no_assistant": ("sft", b'{"conversations": [{"role": "user", "content": "x"}]}'),
    "empty_conversations": ("sft", b'{"conversations": []}'),
}


def good_line(kind, i):
    if kind == "pretrain":
        return {"text": f"good line {i}"}
    return {"conversations": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


@pytest.mark.parametrize("gz", [False, True], ids=["jsonl", "gz"])
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_line_names_file_and_line(tmp_path, shipped_tokenizer, case, gz):
    kind, bad = BAD_LINES[case]
    lines = [good_line(kind, 1), "", bad, good_line(kind, 4), good_line(kind, 5)]  # line 2 blank, line 3 bad
    path = write_jsonl(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"), lines)
    with pytest.raises(DataError, match="skip_bad_lines") as e:
        list(iter_records(str(path), kind))
    assert str(e.value).startswith(f"{path}:3: ")
    cache_root = tmp_path / "cache"
    with pytest.raises(DataError, match=f"{path}:3"):
        build_cache(str(path), kind, shipped_tokenizer, str(cache_root), 0.0, **quiet)
    assert not cache_root.exists() or not any(cache_root.iterdir())  # no half-written cache left behind
    # skip_bad_lines: skipped and counted, the rest kept.
    stats = ReadStats()
    got = list(iter_records(str(path), kind, skip_bad_lines=True, stats=stats))
    assert len(got) == stats.records == 3 and stats.skipped == 1
    assert stats.skipped_examples[0].startswith(f"{path}:3: ")
    logs = []
    d = build_cache(str(path), kind, shipped_tokenizer, str(cache_root), 0.0, skip_bad_lines=True, log=logs.append)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["skipped"] == 1 and meta["records"] == 3 and meta["train"]["documents"] == 3
    assert any(f"{path}:3" in m for m in logs) and any("1 skipped" in m for m in logs)


def _read_data(path):
    return list(iter_records(str(path), "pretrain"))


def _read_task(path):
    from nanollada.evaluation.tasks import load_task_file
    return load_task_file(str(path))


def _read_tokenizer_texts(path):
    from nanollada.tokenizer import iter_training_texts
    return list(iter_training_texts([str(path)]))


# The three callers of records.read_jsonl: data caches, evaluation task files, tokenizer training.
READERS = {"data": _read_data, "task": _read_task, "tokenizer": _read_tokenizer_texts}
BAD_JSONL = {"utf8": (b'{"text": "caf\xe9 \xff"}', "not valid UTF-8 (invalid continuation byte at byte 13)"),
             "json": (b'{"text": "unterminated', "not valid JSON: Unterminated string starting at (column 10)"),
             "not_object": (b'["text"]', "not a JSON object")}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_one_jsonl_reader_names_file_and_line_for_every_caller(tmp_path, reader, case):
    bad, reason = BAD_JSONL[case]
    for gz in (False, True):
        path = write_jsonl(tmp_path / ("x.jsonl.gz" if gz else "x.jsonl"), [{"text": "a"}, "", bad, {"text": "b"}])
        with pytest.raises(DataError) as e:
            READERS[reader](path)
        assert str(e.value).startswith(f"{path}:3: {reason}"), str(e.value)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_truncated_gzip_names_file_and_line(tmp_path, reader):
    path = write_jsonl(tmp_path / "t.jsonl.gz", [{"text": t} for t in english_lines(400, seed=21)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"^{path}:\d+: unreadable \("):
        READERS[reader](path)


def test_tokenizer_training_refuses_records_without_text(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "a"}, {"conversations": [{"role": "user", "content": "q"}]},
                                                {"txt": "typo"}])
    with pytest.raises(DataError, match=rf"^{path}:3: not a pretrain or SFT record"):
        _read_tokenizer_texts(path)


def test_many_bad_lines_are_all_counted(tmp_path):
    lines = [("{bad" if i % 3 == 0 else {"text": str(i)}) for i in range(30)]
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    stats = ReadStats()
    assert len(list(iter_records(str(path), "pretrain", True, stats))) == 20
    assert stats.skipped == 10 and len(stats.skipped_examples) == 5
    assert stats.skipped_examples[1].startswith(f"{path}:4: ")


def test_missing_data_file(tmp_path, shipped_tokenizer):
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.jsonl \(resolved to /"):
        build_cache(str(tmp_path / "nope.jsonl"), "pretrain", shipped_tokenizer, str(tmp_path), 0.0, **quiet)


# ---------------------------------------------------------------------------------------------- cache
def test_cache_is_reused_and_keyed(tmp_path, shipped_tokenizer, tiny_tokenizer):
    path = write_jsonl(tmp_path / "k.jsonl", [{"text": t} for t in english_lines(20, seed=17)])
    root = str(tmp_path / "cache")
    logs = []
    a = build_cache(str(path), "pretrain", shipped_tokenizer, root, 0.1, log=logs.append)
    assert len(logs) == 1 and "cached" in logs[0]
    stamp = {f.name: f.stat().st_mtime_ns for f in a.iterdir()}
    assert {"meta.json", "train.tokens.bin", "train.offsets.npy", "val.tokens.bin", "val.offsets.npy"} <= set(stamp)
    b = build_cache(str(path), "pretrain", shipped_tokenizer, root, 0.1, log=logs.append)
    assert b == a and len(logs) == 1  # not rebuilt
    assert {f.name: f.stat().st_mtime_ns for f in b.iterdir()} == stamp
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [a.name]  # no temporary directories left

    key = cache_key(str(path), "pretrain", shipped_tokenizer, 0.1, None)
    assert a.name == key and key.startswith("k-pretrain-")
    assert cache_key(str(path), "pretrain", tiny_tokenizer, 0.1, None) != key
    assert cache_key(str(path), "pretrain", shipped_tokenizer, 0.2, None) != key
    assert cache_key(str(path), "sft", shipped_tokenizer, 0.1, None) != key
    assert cache_key(str(path), "pretrain", shipped_tokenizer, 0.1, 64) != key
    c = build_cache(str(path), "pretrain", tiny_tokenizer, root, 0.1, **quiet)
    assert c != a and json.loads((c / "meta.json").read_text())["tokenizer"] == tiny_tokenizer.fingerprint()
    # Same name, changed content: a new key, and the new cache holds the new text.
    write_jsonl(path, [{"text": "changed"}] * 3)
    assert cache_key(str(path), "pretrain", shipped_tokenizer, 0.1, None) != key
    d = build_cache(str(path), "pretrain", shipped_tokenizer, root, 0.0, **quiet)
    assert d not in (a, c) and json.loads((d / "meta.json").read_text())["records"] == 3


def test_sft_cache_truncates_to_max_len(tmp_path, shipped_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", SFT)
    d = build_cache(str(path), "sft", shipped_tokenizer, str(tmp_path), 0.0, max_len=20, **quiet)
    meta = json.loads((d / "meta.json").read_text())
    lengths = [len(shipped_tokenizer.render_chat(r["conversations"])[0]) for r in SFT]
    assert meta["truncated"] == sum(n > 20 for n in lengths) > 0
    c = TokenCache(d, "train")
    assert np.diff(c.offsets).tolist() == [min(n, 20) for n in lengths]
    assert c.mask is not None and len(c.mask) == len(c.tokens)


# ---------------------------------------------------------------------------------------------- sampler
def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_mixture_sampler_is_deterministic_and_resumable():
    sizes, weights = [7, 13], [1.0, 1.0]
    s = take(MixtureSampler(sizes, weights, seed=3), 100)
    assert s == take(MixtureSampler(sizes, weights, seed=3), 100)
    assert s != take(MixtureSampler(sizes, weights, seed=4), 100)
    assert sorted(s[:20]) == list(range(20)) and sorted(s[20:40]) == list(range(20))  # epochs are permutations
    assert s[:20] != s[20:40]  # reshuffled each epoch
    for k in (1, 5, 19, 20, 21, 57):
        assert take(MixtureSampler(sizes, weights, seed=3, start=k), 100 - k) == s[k:]


def test_mixture_sampler_weights_change_epoch_counts():
    def counts(weights):
        e0 = MixtureSampler([10, 20], weights, seed=0).epoch_order(0).tolist()
        # The stream's first epoch is exactly that order.
        assert take(MixtureSampler([10, 20], weights, seed=0), len(e0)) == e0
        return sum(i < 10 for i in e0), sum(i >= 10 for i in e0), e0

    a0, a1, e = counts([1.0, 1.0])
    assert (a0, a1) == (10, 20)
    b0, b1, e = counts([2.0, 0.5])
    assert (b0, b1) == (20, 10)
    assert sorted(i for i in e if i < 10) == sorted(list(range(10)) * 2)  # weight 2: every row twice
    assert len(set(i for i in e if i >= 10)) == 10  # weight 0.5: half the rows, none repeated
    c0, c1, e = counts([0.0, 1.0])
    assert (c0, c1) == (0, 20)
    with pytest.raises(ValueError, match="no training rows"):
        MixtureSampler([0, 5], [1.0, 0.0])


def test_mixture_sampler_ranks_partition_the_stream():
    sizes, weights = [5, 11], [1.0, 2.0]
    full = take(MixtureSampler(sizes, weights, seed=1), 120)
    for start in (0, 6):
        r0 = take(MixtureSampler(sizes, weights, seed=1, start=start, rank=0, world_size=2), 40)
        r1 = take(MixtureSampler(sizes, weights, seed=1, start=start, rank=1, world_size=2), 40)
        assert r0 == full[start::2][:40] and r1 == full[start + 1::2][:40]
        merged = [x for pair in zip(r0, r1) for x in pair]
        assert merged == full[start:start + 80]
