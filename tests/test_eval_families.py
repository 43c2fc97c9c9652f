"""`nanollada eval`'s newer families: Winogrande-style context choice, rolling perplexity of raw .txt files (windows,
word/byte perplexity), long perplexity records in windows, LAMBADA-style cloze for every decoder, the query template
by language, and file:line errors. Crafted or random tiny models only (no training): fast."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import write_jsonl
from nanollada.data.records import DataError
from nanollada.evaluation.runner import EvalSettings, _summary, choice_pairs, evaluate_task
from nanollada.evaluation.tasks import (Task, detect_family, load_task_file, query_language, resolve_task,
                                        split_documents)
from nanollada.loading import LoadedModel
from nanollada.model import ModelConfig, Transformer
from nanollada.paradigms.base import rolling_windows
from test_eval import crafted

SETTINGS = EvalSettings(batch_size=4, samples=4, seed=0)


def bigram(tok, causal: bool = True, seed: int = 0) -> LoadedModel:
    """Random embeddings, every block adds zero: the logits at a position depend on that position's token only (a
    bigram model), so an AR likelihood does not depend on how much context a window gives."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32,
                      causal=causal)
    model = Transformer(cfg)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.wo.weight.zero_()
            b.ffn.w_down.weight.zero_()
    return LoadedModel(model.eval(), tok, "ar" if causal else "diffusion", "bigram")


def exact_bigram_nll(loaded, row: list[int]) -> float:
    """-sum log p(x_j | x_{j-1}) from one-token forwards (the model is a bigram model)."""
    with torch.no_grad():
        logp = F.log_softmax(loaded.model(torch.tensor(row[:-1])[:, None])[:, 0].float(), -1)  # (len - 1, V)
    return -float(logp.gather(1, torch.tensor(row[1:])[:, None]).sum())


# ------------------------------------------------------------------------------------------------ windows
def test_rolling_windows_score_every_token_once_within_max_len():
    row = list(range(100, 200))  # bos = 100
    for max_len, stride in ((32, None), (32, 30), (32, 1), (16, 5), (200, None)):
        wins = rolling_windows(row, max_len, stride)
        scored = [t for _, tgt in wins for t in tgt]
        assert scored == row[1:]
        assert all(c[0] == 100 and len(c) + len(t) <= max_len for c, t in wins)
        for c, t in wins[1:]:  # the context is bos + the tokens just before the target, as many as fit
            start = row.index(t[0])
            assert c[1:] == row[max(1, start - (max_len - 1 - len(t))): start]
    assert len(rolling_windows(row, 32)) == 1 + math.ceil((100 - 32) / 16)
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(row, 32, 31)


def test_long_records_are_scored_in_windows_exactly_for_ar(shipped_tokenizer):
    """Issue 17 item 3: a perplexity record longer than max_seq_len is scored whole, not cut to its first tokens."""
    tok = shipped_tokenizer
    loaded = bigram(tok)
    text = "the quick brown fox jumps over the lazy dog and keeps running far away " * 6
    row = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    assert len(row) > 3 * 32
    for stride in (None, 7, 30):
        r = evaluate_task(loaded, Task("p", "perplexity", "x", [{"text": text}, {"text": "short one"}]),
                          EvalSettings(batch_size=4, stride=stride))
        short = [tok.bos_id] + tok.encode("short one") + [tok.eos_id]
        assert r["tokens"] == len(row) - 1 + len(short) - 1 and r["windowed"] == 1 and r["truncated"] == 0
        want = exact_bigram_nll(loaded, row) + exact_bigram_nll(loaded, short)
        assert r["nats_per_token"] * r["tokens"] == pytest.approx(want, rel=1e-5)
        assert "scored in windows, stride" in _summary(r, tok.vocab_size)


# ------------------------------------------------------------------------------------------------ .txt files
WIKI = """ = Valkyria Chronicles =

 Senjo no Valkyria is a tactical role playing game .
 It was released in January 2011 .

 = = Gameplay = =

 As with previous games , the player controls a squad .

 = Tower Building =

 The Tower Building is a skyscraper .
"""


def test_text_files_split_on_headings_or_blank_lines(tmp_path):
    docs = split_documents(WIKI.splitlines())
    assert [ln for ln, _ in docs] == [1, 10]  # WikiText top-level headings start documents; "= = x = =" does not
    assert docs[0][1].startswith("= Valkyria") and "Gameplay" in docs[0][1] and docs[1][1].endswith("skyscraper .")
    para = split_documents(["one", "two", "", "", "three", "  ", "four"])
    assert para == [(1, "one\ntwo"), (5, "three"), (7, "four")]
    assert split_documents(["# A", "x", "", "# B", "y"]) == [(1, "# A\nx"), (4, "# B\ny")]
    assert split_documents(["a", "", "b"], "file") == [(1, "a\n\nb")]
    f = tmp_path / "wiki.txt"
    f.write_text(WIKI, encoding="utf-8")
    t = resolve_task(str(f))
    assert t.family == "rolling_perplexity" and t.name == "wiki" and t.total == 2 and t.notes["split"] == "heading"
    assert len(resolve_task(str(f), text_split="blank").items) == 6  # headings are paragraphs too


def test_text_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\nstill fine\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=rf"^{bad}:4: not valid UTF-8"):
        resolve_task(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        resolve_task(str(empty))
    with pytest.raises(DataError, match="task file not found"):
        resolve_task(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("causal", [True, False])
def test_rolling_perplexity_token_word_and_byte_levels(shipped_tokenizer, causal):
    tok = shipped_tokenizer
    docs = ["the quick brown fox jumps over the lazy dog " * 12, "a short document\nof two lines"]
    task = Task("w", "rolling_perplexity", "x", [{"text": d} for d in docs])
    r = evaluate_task(crafted(tok, None, causal), task, SETTINGS)  # uniform logits: NLL = tokens * ln V
    tokens = sum(len(tok.encode(d)) for d in docs)  # bos + text, no eos: every text token scored once
    assert r["tokens"] == tokens and r["documents"] == 2 and r["windowed"] == 1
    words = sum(len(d.split()) + (d != d.rstrip()) for d in docs)  # lm-eval's re.split(r"\s+") count
    n_bytes = sum(len(d.encode()) for d in docs)
    assert r["words"] == words and r["bytes"] == n_bytes
    nll = tokens * math.log(tok.vocab_size)
    rel = 1e-5 if causal else 0.3  # diffusion: the Monte-Carlo bound, unbiased
    assert r["nll"] == pytest.approx(nll, rel=rel)
    assert r["word_perplexity"] == pytest.approx(math.exp(r["nll"] / words), rel=1e-9)
    assert r["byte_perplexity"] == pytest.approx(math.exp(r["nll"] / n_bytes), rel=1e-9)
    assert r["bits_per_byte"] == pytest.approx(r["nll"] / n_bytes / math.log(2), rel=1e-9)
    assert r["estimate"] == ("exact" if causal else "elbo_bound_4_samples")
    line = _summary(r, tok.vocab_size)
    assert "word ppl" in line and "bits/byte" in line and f"chance: ppl {tok.vocab_size}" in line


# ------------------------------------------------------------------------------------------------ context choice
@pytest.mark.parametrize("causal", [True, False])
def test_context_choice_picks_the_context_that_explains_the_continuation(shipped_tokenizer, causal):
    """Winogrande-style: the continuation is shared, so only a model that reads the context can score above chance;
    this crafted model prefers the continuation's tokens everywhere, so it ties -- use a bigram model instead and
    check the prediction against a direct log-likelihood comparison."""
    tok = shipped_tokenizer
    assert detect_family({"context_options": ["a", "b"], "continuation": "c", "gold": 0}) == "context_choice"
    loaded = bigram(tok, causal)
    items = [{"context_options": ["The trophy did not fit because the trophy", "The trophy did not fit because "
                                  "the suitcase"], "continuation": " was too big.", "gold": g} for g in (0, 1)]
    items.append({"context_options": ["I ate the", "I ate a", "We ate the"], "continuation": " apple", "gold": 2})
    r = evaluate_task(loaded, Task("wg", "context_choice", "x", items), SETTINGS)
    assert r["chance"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    # recompute the prediction of every item from the interface directly
    correct = []
    for it in items:
        cont = tok.encode(it["continuation"])
        lp, _ = loaded.interface.conditional_logprob([[tok.bos_id] + tok.encode(o) for o in it["context_options"]],
                                                     [cont] * len(it["context_options"]), SETTINGS,
                                                     groups=[0] * len(it["context_options"]))
        correct.append(int(lp.argmax()) == it["gold"])
    assert r["accuracy"] == pytest.approx(sum(correct) / 3)
    assert sum(correct[:2]) == 1  # the same item with either gold: exactly one is right


def test_context_choice_file_errors(tmp_path):
    f = write_jsonl(tmp_path / "wg.jsonl", [{"context_options": ["a", "b"], "continuation": "c", "gold": 1},
                                            {"context_options": ["a", "b"], "continuation": "c", "gold": 2}])
    with pytest.raises(DataError, match=rf"^{f}:2: .*index into the 2 context_options"):
        load_task_file(str(f))
    g = write_jsonl(tmp_path / "wg2.jsonl", [{"context_options": ["a"], "continuation": "c", "gold": 0}])
    with pytest.raises(DataError, match=rf"^{g}:1: .*at least 2"):
        load_task_file(str(g))


# ------------------------------------------------------------------------------------------------ query templates
def test_query_template_follows_the_language_of_the_item(shipped_tokenizer, tmp_path):
    """Issue 17 item 4: English queries no longer get the Chinese prompt; the templates used are reported."""
    tok = shipped_tokenizer
    en = {"query": "What is the capital of France?", "choices": ["Paris", "Rome"], "gold": 0}
    zh = {"query": "法国的首都是哪里？", "choices": ["巴黎", "罗马"], "gold": 0}
    forced = dict(en, language="zh")
    assert [query_language(x) for x in (en, zh, forced)] == ["en", "zh", "zh"]
    (ctx, tgt), _ = choice_pairs(tok, en)
    assert tok.decode(ctx[1:]) == "Question: What is the capital of France?\nAnswer:" and tok.decode(tgt) == " Paris"
    (ctx, tgt), _ = choice_pairs(tok, zh)
    assert tok.decode(ctx[1:]) == "问题：法国的首都是哪里？\n答案：" and tok.decode(tgt) == "巴黎"
    f = write_jsonl(tmp_path / "mc.jsonl", [en, zh, forced])
    t = load_task_file(str(f))
    assert t.notes["query_templates"] == {"en": {"template": "Question: {query}\nAnswer:", "delimiter": " ",
                                                 "items": 1},
                                          "zh": {"template": "问题：{query}\n答案：", "delimiter": "", "items": 2}}
    r = evaluate_task(crafted(tok, None, True), t, SETTINGS)
    assert r["query_templates"] == t.notes["query_templates"] and "chance 50.0%" in _summary(r)
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(en, language="fr")])
    with pytest.raises(DataError, match=rf"^{bad}:1: .*language"):
        load_task_file(str(bad))


# ------------------------------------------------------------------------------------------------ cloze decoders
@pytest.mark.parametrize("causal", [True, False])
def test_lambada_style_cloze_for_every_decoder(shipped_tokenizer, causal):
    tok = shipped_tokenizer
    loaded = crafted(tok, tok.encode(" the"), causal)  # always predicts " the"
    items = [{"context": "He looked at", "continuation": " the"}, {"context": "She saw", "continuation": " dog"},
             {"context": "Then", "continuation": " the the"}]
    r = evaluate_task(loaded, Task("lam", "cloze", "x", items), SETTINGS)
    assert r["exact_match"] == pytest.approx(2 / 3)
    want = ["ar"] if causal else ["diffusion/low_confidence", "diffusion/random", "diffusion/threshold",
                                   "diffusion/threshold_topk"]
    assert list(r["decoders"]) == want
    for label, d in r["decoders"].items():
        assert d["exact_match"] == pytest.approx(2 / 3), label
        assert d["forwards"] >= 1 and d["tokens_per_forward"] > 0
    assert math.isfinite(r["logprob_per_token"])
    assert "per decoder:" in _summary(r) and "chance" in _summary(r)
    assert "decoders" not in evaluate_task(loaded, Task("lam", "cloze", "x", items), SETTINGS, strategies=[])
