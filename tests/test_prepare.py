"""`nanollada prepare`: token caches built once from a file list or a fit config, with exact summary numbers, the
same cache keys as training (LMDataModule finds them), per-language totals and the token budget of a config."""

import json

import pytest
import yaml

from conftest import english_lines, write_jsonl
from nanollada.data.records import SHARED_VAL_FRACTION, is_validation

ZH = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "今天天气很好，我们去公园散步吧。", "学而时习之，不亦说乎？",
      "长城是中国古代的伟大工程。", "春眠不觉晓，处处闻啼鸟。"]


def zh_lines(n):
    return [ZH[i % len(ZH)] + f"第{i}段。" + ZH[(i * 3) % len(ZH)] for i in range(n)]


@pytest.fixture
def corpus(tmp_path):
    en = english_lines(300, seed=1, words=20)
    zh = zh_lines(200)
    a = write_jsonl(tmp_path / "en-books.jsonl", [{"text": t} for t in en] + ["{broken json"])
    b = write_jsonl(tmp_path / "zh-prose.jsonl.gz", [{"text": t} for t in zh])
    return {"en": (a, en), "zh": (b, zh)}


def expected(texts, tok, val_fraction=SHARED_VAL_FRACTION):
    val = [t for t in texts if is_validation(t, val_fraction)]
    return {"train_docs": len(texts) - len(val), "val_docs": len(val), "characters": sum(map(len, texts)),
            "tokens": sum(len(tok.encode(t)) + 2 for t in texts),  # + bos, eos
            "val_tokens": sum(len(tok.encode(t)) + 2 for t in val)}


def test_prepare_files_numbers_and_reuse(corpus, tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    from nanollada.prepare import format_summary, prepare_files
    files = [str(corpus["en"][0]), str(corpus["zh"][0])]
    logs = []
    r = prepare_files(files, "pretrain", tiny_tokenizer_path, str(tmp_path / "cache"), val_fraction=0.1,
                      skip_bad_lines=True, weights=[0.5, 2.0], progress_every=100, log=logs.append)
    for summary, key in zip(r.files, ("en", "zh")):
        exp = expected(corpus[key][1], tiny_tokenizer, 0.1)
        got = {k: getattr(summary, k) for k in exp}
        assert got == exp, key
        assert summary.language == key and not summary.reused
        assert summary.chars_per_token == pytest.approx(exp["characters"] / exp["tokens"])
    assert r.files[0].skipped == 1 and r.files[1].skipped == 0
    assert r.files[0].val_docs > 0 and r.files[1].val_docs > 0
    assert any("300 records read" in m or "200 records read" in m for m in logs), logs  # progress lines
    table = format_summary(r)
    assert "| **en total** | en |" in table and "| **zh total** | zh |" in table and "| **total** |" in table
    assert f"{r.files[0].tokens + r.files[1].tokens:,}" in table

    again = prepare_files(files, "pretrain", tiny_tokenizer_path, str(tmp_path / "cache"), val_fraction=0.1,
                          skip_bad_lines=True, log=logs.append)
    assert all(f.reused for f in again.files)
    assert [f.cache for f in again.files] == [f.cache for f in r.files]
    assert [f.tokens for f in again.files] == [f.tokens for f in r.files]
    assert "reused" in format_summary(again)


def test_sft_truncation_and_training_finds_the_cache(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    from nanollada.data.datamodule import LMDataModule
    from nanollada.prepare import prepare_files
    convs = [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in zip(english_lines(60, seed=2, words=8), english_lines(60, seed=3, words=12 + 0))]
    f = write_jsonl(tmp_path / "sft-en.jsonl", convs)
    r = prepare_files([str(f)], "sft", tiny_tokenizer_path, str(tmp_path / "cache"), max_len=20, log=lambda m: None)
    lengths = [len(tiny_tokenizer.render_chat(c["conversations"])[0]) for c in convs]
    s = r.files[0]
    assert s.truncated == sum(n > 20 for n in lengths) > 0
    assert s.tokens == sum(min(n, 20) for n in lengths)
    assert s.train_docs + s.val_docs == 60 and s.language == "en"
    # LMDataModule with the same settings (SFT truncates to seq_len) uses exactly this cache
    dm = LMDataModule([str(f)], kind="sft", tokenizer=str(tiny_tokenizer_path), seq_len=20,
                      cache_dir=str(tmp_path / "cache"))
    assert [str(d) for d in dm._cache_dirs()] == [s.cache]


def test_prepare_config_budget_and_data_root(corpus, tmp_path, tiny_tokenizer_path, monkeypatch):
    from nanollada.prepare import prepare_config
    cfg = {"trainer": {"max_steps": 10, "accumulate_grad_batches": 2, "devices": 1},
           "data": {"train_files": ["en-books.jsonl", "zh-prose.jsonl.gz"], "kind": "pretrain", "weights": [1.0, 3.0],
                    "data_root": "does/not/exist", "tokenizer": str(tiny_tokenizer_path), "seq_len": 32,
                    "batch_size": 4, "val_fraction": 0.0078125, "cache_dir": str(tmp_path / "cache"),
                    "skip_bad_lines": True}}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(FileNotFoundError, match=r"en-books\.jsonl \(resolved to /.*NANOLLADA_DATA"):
        prepare_config(path, log=lambda m: None)
    monkeypatch.setenv("NANOLLADA_DATA", str(tmp_path))  # the env variable overrides data.data_root
    r = prepare_config(path, log=lambda m: None)
    train = [f.tokens - f.val_tokens for f in r.files]
    b = r.budget
    assert b["epoch_tokens"] == train[0] + 3 * train[1]
    assert b["epoch_tokens_by_language"] == {"en": train[0], "zh": 3 * train[1]}
    assert b["train_tokens"] == 10 * 4 * 2 * 32
    assert b["epochs"] == pytest.approx(b["train_tokens"] / b["epoch_tokens"])


def test_prepare_command(corpus, tmp_path, tiny_tokenizer_path, capsys):
    from nanollada.commands import COMMANDS
    run = COMMANDS["prepare"]
    out_json = tmp_path / "s.json"
    args = ["--files", str(corpus["en"][0]), str(corpus["zh"][0]), "--kind", "pretrain", "--skip_bad_lines",
            "--tokenizer", str(tiny_tokenizer_path), "--cache_dir", str(tmp_path / "cache"), "--json", str(out_json),
            "--markdown", str(tmp_path / "s.md")]
    run(args)
    text = capsys.readouterr().out
    assert "en-books.jsonl" in text and "zh-prose.jsonl.gz" in text and "built" in text
    data = json.loads(out_json.read_text())["--files"]
    assert [f["language"] for f in data["files"]] == ["en", "zh"]
    assert (tmp_path / "s.md").read_text().strip() in text
    run(args)
    assert "reused" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # a missing file names itself
        run(["--files", str(tmp_path / "nope.jsonl"), "--kind", "pretrain", "--tokenizer", str(tiny_tokenizer_path),
             "--cache_dir", str(tmp_path / "cache")])
    assert "nope.jsonl" in str(e.value)
    with pytest.raises(SystemExit):  # a malformed line without --skip_bad_lines stops with file:line
        run(["--files", str(corpus["en"][0]), "--kind", "pretrain", "--tokenizer", str(tiny_tokenizer_path),
             "--cache_dir", str(tmp_path / "cache2")])
    with pytest.raises(SystemExit):
        run(["--files", str(corpus["en"][0])])  # --kind missing
    capsys.readouterr()


def test_language_from_file_name():
    from nanollada.prepare import language
    assert [language(f) for f in ("x/en-gutenberg.jsonl.gz", "alpaca-en.jsonl.gz", "sharegpt-zh-1k.jsonl.gz",
                                  "zh-poetry.jsonl", "data/pretrain.jsonl")] == ["en", "en", "zh", "zh", "other"]


# ------------------------------------------------------------------------------------------------ resolved like fit
def test_prepare_config_resolves_data_like_fit(tmp_path, tiny_tokenizer_path):
    """The data section goes through jsonargparse against LMDataModule's signature: LMDataModule's defaults fill the
    keys a config leaves out (here seq_len, the SFT truncation in the cache key), LightningCLI-style overrides apply,
    and a misspelt key is an error instead of a silently ignored setting."""
    from nanollada.data.datamodule import LMDataModule
    from nanollada.prepare import prepare_config
    convs = [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in zip(english_lines(40, seed=4, words=8), english_lines(40, seed=5, words=200))]
    f = write_jsonl(tmp_path / "sft-en.jsonl", convs)
    data = {"train_files": [str(f)], "kind": "sft", "tokenizer": str(tiny_tokenizer_path),
            "cache_dir": str(tmp_path / "cache")}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"max_steps": 3}, "data": data}))
    r = prepare_config(path, log=lambda m: None)
    assert [s.cache for s in r.files] == [str(d) for d in LMDataModule(**data)._cache_dirs()]  # seq_len default
    assert r.files[0].truncated > 0  # 200-word answers exceed LMDataModule's default seq_len
    r20 = prepare_config(path, overrides=["--data.seq_len=20"], log=lambda m: None)
    assert [s.cache for s in r20.files] == [str(d) for d in LMDataModule(**data, seq_len=20)._cache_dirs()]
    assert r20.files[0].tokens < r.files[0].tokens
    path.write_text(yaml.safe_dump({"data": {**data, "seq_lenn": 64}}))
    with pytest.raises(ValueError, match="seq_lenn"):
        prepare_config(path, log=lambda m: None)


def test_build_cache_progress_is_a_callback(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    from nanollada.data.cache import build_cache
    f = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in english_lines(25, seed=6)])
    seen = []
    build_cache(str(f), "pretrain", tiny_tokenizer, str(tmp_path / "cache"), 0.1, log=lambda m: None,
                progress=seen.append)
    assert seen == list(range(1, 26))  # records read so far, after each record
