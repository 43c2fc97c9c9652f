"""`nanollada eval`: task files and family detection, known-answer scoring with crafted models, clear errors, and the
CLI end to end on tiny AR and diffusion checkpoints (one side-by-side table)."""

import json
import math

import pytest
import torch

from conftest import CONFIGS, finish, fit_config, start_cli, write_jsonl
from nanollada.data.records import SHARED_VAL_FRACTION, DataError, is_validation
from nanollada.evaluation.runner import EvalSettings, checkpoint_labels, evaluate_task, fit_length, format_markdown
from nanollada.evaluation.tasks import Task, detect_family, load_task_file, resolve_task
from nanollada.loading import LoadedModel
from nanollada.model import ModelConfig, Transformer

STEPS = dict(max_steps=3, val_check_interval=3, limit_val_batches=1, log_every_n_steps=1)


def crafted(tok, preferred: list[int] | None, causal: bool) -> LoadedModel:
    """A model whose logits do not depend on the input: every block adds zero, the tied embedding rows are all ones
    except ``preferred`` (five times larger), so every position gives the preferred tokens a 64-nat higher logit.
    ``preferred=None``: all-zero embeddings, i.e. uniform logits."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64,
                      causal=causal)
    model = Transformer(cfg)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.wo.weight.zero_()
            b.ffn.w_down.weight.zero_()
        if preferred is None:
            model.embed.weight.zero_()
        else:
            model.embed.weight.fill_(1.0)
            model.embed.weight[preferred] = 5.0
    return LoadedModel(model.eval(), tok, "ar" if causal else "diffusion", "crafted")


SETTINGS = EvalSettings(batch_size=3, samples=8, seed=0)


# ------------------------------------------------------------------------------------------------ known answers
@pytest.mark.parametrize("causal", [True, False])
def test_minimal_pairs_accuracy_per_phenomenon_on_a_known_answer(shipped_tokenizer, causal):
    tok = shipped_tokenizer
    liked, other = "the dog ran", "a cat sat"
    assert not set(tok.encode(liked)) & set(tok.encode(other))
    loaded = crafted(tok, tok.encode(liked), causal)
    items = ([{"phenomenon": "right", "good": liked, "bad": other}] * 3
             + [{"phenomenon": "wrong", "good": other, "bad": liked}] * 2)
    r = evaluate_task(loaded, Task("mp", "minimal_pairs", "x", items), SETTINGS)
    assert r["accuracy"] == pytest.approx(3 / 5) and r["chance"] == 0.5
    assert r["groups"] == {"right": {"accuracy": 1.0, "items": 3}, "wrong": {"accuracy": 0.0, "items": 2}}
    assert r["items"] == 5 and r["items_per_s"] > 0


@pytest.mark.parametrize("causal", [True, False])
def test_multiple_choice_picks_the_likely_choice_query_and_blank_styles(shipped_tokenizer, causal):
    tok = shipped_tokenizer
    loaded = crafted(tok, tok.encode("the dog ran"), causal)
    items = [
        {"query": "谁跑了？", "choices": ["a cat sat", "the dog ran", "a cat"], "gold": 1, "subject": "q"},
        {"context": "Story: #idiom# ran", "choices": ["a cat", "the dog"], "gold": 1, "subject": "blank"},
        {"context": "Story: #idiom# ran", "choices": ["the dog", "a cat", "a cat sat", "cat"], "gold": 0},
        {"context": "Once upon a time", "choices": [" a cat", " the dog ran"], "gold": 1},  # continuation style
    ]
    task = Task("mc", "multiple_choice", "x", items)
    r = evaluate_task(loaded, task, SETTINGS)
    assert r["accuracy"] == 1.0 and r["accuracy_norm"] == 1.0
    assert r["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4 + 1 / 2) / 4) == task.chance
    assert set(r["groups"]) == {"q", "blank"}
    # the same file with the likely choice marked wrong scores zero
    wrong = [dict(it, gold=(it["gold"] + 1) % len(it["choices"])) for it in items]
    assert evaluate_task(loaded, Task("mc", "multiple_choice", "x", wrong), SETTINGS)["accuracy"] == 0.0


@pytest.mark.parametrize("causal", [True, False])
def test_cloze_exact_match_of_the_greedy_continuation(shipped_tokenizer, causal):
    tok = shipped_tokenizer
    the = tok.encode(" the")
    assert tok.encode(" the the the") == the * 3
    loaded = crafted(tok, the, causal)
    items = [{"context": "once upon a time", "continuation": " the the the"},
             {"context": "once", "continuation": " dog dog"},
             {"context": "once " * 70, "continuation": " the the the the"},  # context cut to fit max_seq_len=64
             {"context": "once", "continuation": " the" * 30}]  # with the item above: too long for one batch
    r = evaluate_task(loaded, Task("cl", "cloze", "x", items), EvalSettings(batch_size=4, samples=2))
    assert r["exact_match"] == 0.75 and r["tokens"] == 39 and r["truncated"] == 1
    assert r["examples"][1]["generated"] == " the the"
    assert math.isfinite(r["logprob_per_token"]) and r["logprob_per_token"] < 0


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(shipped_tokenizer):
    tok = shipped_tokenizer
    text = "the quick brown fox jumps over the lazy dog " * 3
    n = len(tok.encode(text)) + 1  # text + eos, scored after bos
    task = Task("p", "perplexity", "x", [{"text": text}, {"text": "hello"}])
    r = evaluate_task(crafted(tok, None, True), task, SETTINGS)
    assert r["tokens"] == n + len(tok.encode("hello")) + 1 and r["estimate"] == "exact"
    assert r["nats_per_token"] == pytest.approx(math.log(tok.vocab_size), rel=1e-5)
    assert r["ppl"] == pytest.approx(tok.vocab_size, rel=1e-4)
    d = evaluate_task(crafted(tok, None, False), task, SETTINGS)  # ELBO: unbiased, noisy
    assert d["tokens"] == r["tokens"] and 0.5 < d["nats_per_token"] / math.log(tok.vocab_size) < 1.5
    long = Task("p", "perplexity", "x", [{"text": text * 10}])  # longer than max_seq_len=64: windows, every token
    n_long = len(tok.encode(text * 10)) + 1
    for causal in (True, False):
        r = evaluate_task(crafted(tok, None, causal), long, SETTINGS)
        assert r["tokens"] == n_long > 63 and r["windowed"] == 1 and r["truncated"] == 0 and r["stride"] == 32
        assert r["windows"] == 1 + math.ceil((n_long - 63) / 32)
        assert r["nats_per_token"] == pytest.approx(math.log(tok.vocab_size), rel=1e-5 if causal else 0.5)


def test_fit_length_keeps_bos_and_the_start_of_the_target():
    assert fit_length([2, 10, 11], [5, 6], 8) == ([2, 10, 11], [5, 6], False)
    assert fit_length([2, 10, 11, 12], [5, 6], 4) == ([2, 12], [5, 6], True)
    assert fit_length([2, 10], [5, 6, 7, 8, 9], 4) == ([2], [5, 6, 7], True)


# ------------------------------------------------------------------------------------------------ task files
def test_family_detection():
    assert detect_family({"text": "x"}) == "perplexity"
    assert detect_family({"good": "a", "bad": "b", "phenomenon": "p"}) == "minimal_pairs"
    assert detect_family({"query": "q", "choices": ["a", "b"], "gold": 0}) == "multiple_choice"
    assert detect_family({"context": "c #idiom#", "choices": ["a", "b"], "gold": 0}) == "multiple_choice"
    assert detect_family({"context": "c", "continuation": "d"}) == "cloze"
    assert detect_family({"question": "q"}) is None and detect_family([1]) is None


def test_limit_is_spread_evenly_and_round_robin_over_phenomena(tmp_path):
    """Issue 17: --limit spreads the items evenly over the file (README's promise), per group when grouped."""
    recs = [{"phenomenon": p, "good": f"{p}{i}", "bad": "x"} for p, n in (("A", 6), ("B", 3), ("C", 1))
            for i in range(n)]
    f = write_jsonl(tmp_path / "mp.jsonl.gz", recs)
    t = load_task_file(str(f), limit=6)
    assert t.family == "minimal_pairs" and t.name == "mp" and t.total == 10
    # shares: A 3, B 2, C 1 (round-robin), each spread over its group, file order kept
    assert [it["good"] for it in t.items] == ["A0", "A2", "A4", "B0", "B1", "C0"]
    assert [it["good"] for it in load_task_file(str(f), limit=6).items] == [it["good"] for it in t.items]
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"query": f"q{i}", "choices": ["a", "b"], "gold": 1} for i in range(9)])
    assert [it["query"] for it in load_task_file(str(mc), limit=3).items] == ["q0", "q3", "q6"]
    assert [it["query"] for it in load_task_file(str(mc), limit=2).items] == ["q0", "q4"]
    assert len(load_task_file(str(mc)).items) == 9 and len(load_task_file(str(mc), limit=20).items) == 9


def test_names_resolve_under_the_data_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "eval").mkdir(parents=True)
    (root / "pretrain").mkdir()
    write_jsonl(root / "eval" / "blimp.jsonl.gz", [{"phenomenon": "p", "good": "a b", "bad": "b a"}])
    texts = [f"record number {i}" for i in range(1500)]
    held = [t for t in texts if is_validation(t, SHARED_VAL_FRACTION)]
    assert 3 <= len(held) < 40
    write_jsonl(root / "pretrain" / "en-src.jsonl.gz", [{"text": t, "source": "s"} for t in texts])
    assert resolve_task("blimp", root).family == "minimal_pairs"
    t = resolve_task("ppl-en-src", root)
    assert t.family == "perplexity" and [it["text"] for it in t.items] == held
    assert len(resolve_task("ppl-en-src", root, limit=2).items) == 2
    assert [it["text"] for it in resolve_task(f"ppl:{root / 'pretrain' / 'en-src.jsonl.gz'}").items] == held
    plain = write_jsonl(tmp_path / "held.jsonl", [{"text": "a"}, {"text": "b"}])  # a file path: every record
    assert len(resolve_task(str(plain), root).items) == 2
    monkeypatch.setenv("NANOLLADA_DATA", str(root))
    assert resolve_task("blimp").path == str(root / "eval" / "blimp.jsonl.gz")
    with pytest.raises(DataError, match=r"unknown task 'blimpp'.*known tasks: blimp, ppl-en-src"):
        resolve_task("blimpp")


@pytest.mark.parametrize("lines, lineno, message", [
    ([{"good": "a", "bad": "b"}, {"good": "a", "bad": "b"}, "{not json"], 3, "not valid JSON"),
    ([{"query": "q", "choices": ["a", "b"], "gold": 0}, {"query": "q", "choices": ["a", "b"], "gold": 2}], 2,
     '"gold" must be an index'),
    ([{"query": "q", "choices": ["a", "b"], "gold": 0}, {"query": "q", "choices": "ab", "gold": 0}], 2, '"choices"'),
    ([{"good": "a", "bad": "b"}, {"text": "t"}], 2, "family perplexity in a minimal_pairs file"),
    ([{"question": "q", "answer": "a"}], 1, "cannot tell the task family"),
    ([{"good": "a", "bad": "b"}, b"\xff\xfe bad bytes"], 2, "not valid UTF-8"),
    ([{"context": "c", "continuation": "  "}], 1, '"continuation" must be a non-empty string'),
    (["[1, 2]"], 1, "not a JSON object"),
])
def test_malformed_task_files_name_file_and_line(tmp_path, lines, lineno, message):
    f = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_task_file(str(f))
    assert str(e.value).startswith(f"{f}:{lineno}: ") and message in str(e.value)


def test_empty_missing_and_bad_pretrain_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_task_file(str(empty))
    with pytest.raises(DataError, match="not found"):
        resolve_task(str(tmp_path / "nope.jsonl"), tmp_path)
    bad = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"txt": "b"}])
    with pytest.raises(DataError, match=f"{bad}:2: "):
        resolve_task(f"ppl:{bad}")


def test_markdown_table_is_side_by_side_with_chance():
    assert checkpoint_labels(["a/x/last.ckpt", "b/x/last.ckpt"]) == ["a/x/last.ckpt", "b/x/last.ckpt"]
    assert checkpoint_labels(["a/x/last.ckpt", "b/step1.ckpt"]) == ["last.ckpt", "step1.ckpt"]
    groups = {"A": {"p": 1.0, "q": 1.0}, "D": {"p": 0.0, "q": 1.0}}
    res = {"settings": {"samples": 4, "seed": 0},
           "tasks": [{"name": "mp", "family": "minimal_pairs", "items": 2, "chance": 0.5}],
           "checkpoints": [{"label": "A", "paradigm": "ar", "vocab_size": 9},
                           {"label": "D", "paradigm": "diffusion", "vocab_size": 9}],
           "results": {k: {"mp": {"accuracy": acc, "items_per_s": ips,
                                  "groups": {g: {"accuracy": a, "items": 1} for g, a in groups[k].items()}}}
                       for k, acc, ips in (("A", 1.0, 3.0), ("D", 0.5, 2.0))}}
    md = format_markdown(res)
    assert "| task | metric | A (ar) | D (diffusion) | chance |" in md
    assert "| mp (2) | accuracy | 100.0% | 50.0% | 50.0% |" in md
    assert "|  | items/s | 3.0 | 2.0 |  |" in md
    assert "| p | 1 | 100.0% | 0.0% |" in md


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny AR and diffusion pretrain checkpoints trained for 3 steps, side by side."""
    work = tmp_path_factory.mktemp("eval_ckpts")
    ar_cfg = fit_config(work / "ar", "ar", trainer=STEPS, data=dict(seq_len=64, batch_size=4))
    dm_cfg = fit_config(work / "dm", "dm", base=CONFIGS / "tiny" / "diffusion_pretrain.yaml", trainer=STEPS,
                        data=dict(seq_len=64, batch_size=4))
    procs = [start_cli(["fit", "--config", c], work) for c in (ar_cfg, dm_cfg)]
    for p in procs:
        r = finish(p, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    return work / "ar" / "checkpoints" / "last.ckpt", work / "dm" / "checkpoints" / "last.ckpt"


def test_cli_end_to_end_two_checkpoints_one_table(checkpoints, tmp_path):
    ar, dm = checkpoints
    root = tmp_path / "data"
    (root / "eval").mkdir(parents=True)
    (root / "pretrain").mkdir()
    write_jsonl(root / "eval" / "blimp.jsonl.gz", [{"task": "blimp", "phenomenon": p, "good": "The cat sleeps.",
                                                    "bad": "The cat sleep."} for p in ("agr", "agr", "isl")])
    texts = [f"record number {i}" for i in range(400)]
    write_jsonl(root / "pretrain" / "en-src.jsonl.gz", [{"text": t} for t in texts])
    mc = write_jsonl(tmp_path / "mc.jsonl", [
        {"context": "他做事总是#idiom#。", "choices": ["一丝不苟", "马马虎虎", "画蛇添足"], "gold": 0},
        {"subject": "s", "query": "1+1=?", "choices": ["2", "3", "4", "5"], "gold": 0}])
    cl = write_jsonl(tmp_path / "cl.jsonl", [{"context": "Once upon a", "continuation": " time"}])
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    ok = finish(start_cli(["eval", "--ckpt", ar, "--ckpt", dm, "--tasks", "ppl-en-src", "blimp", mc, cl,
                           "--limit", "2", "--samples", "2", "--batch_size", "4", "--data_root", root,
                           "--output", out, "--markdown", md], tmp_path), timeout=180)
    assert ok.returncode == 0, ok.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert [c["paradigm"] for c in result["checkpoints"]] == ["ar", "diffusion"]
    labels = [c["label"] for c in result["checkpoints"]]
    assert labels == ["ar/checkpoints/last.ckpt", "dm/checkpoints/last.ckpt"]
    assert [t["family"] for t in result["tasks"]] == ["perplexity", "minimal_pairs", "multiple_choice", "cloze"]
    # The CLI's numbers are exactly what the library computes in-process on the same tasks, settings and seed.
    from nanollada.loading import load_checkpoint
    settings = EvalSettings(**result["settings"])
    tasks = [resolve_task(spec, root=root, limit=2) for spec in ("ppl-en-src", "blimp", str(mc), str(cl))]
    metric = {"ppl-en-src": ("nats_per_token", "tokens"), "blimp": ("accuracy",), "mc": ("accuracy", "chance"),
              "cl": ("exact_match",)}
    for label, path in zip(labels, (ar, dm)):
        r = result["results"][label]
        loaded = load_checkpoint(str(path))
        for task in tasks:
            want = evaluate_task(loaded, task, settings)
            for key in metric[task.name]:
                assert r[task.name][key] == pytest.approx(want[key], rel=1e-6), (label, task.name, key)
        assert r["ppl-en-src"]["tokens"] > 0
        assert r["blimp"]["items"] == 2 and set(r["blimp"]["groups"]) == {"agr", "isl"}
        assert r["mc"]["chance"] == pytest.approx((1 / 3 + 1 / 4) / 2)
        assert all(v["items_per_s"] > 0 for v in r.values())
    table = md.read_text(encoding="utf-8")
    assert f"| task | metric | {labels[0]} (ar) | {labels[1]} (diffusion) | chance |" in table
    assert "| blimp (2) | accuracy |" in table and "items/s" in table and "50.0%" in table
    assert "### blimp: accuracy per phenomenon" in table
    assert f"{labels[0]} (ar)" in ok.stdout and "Traceback" not in ok.stderr


def test_cli_errors_are_one_line_messages(tmp_path, capsys):
    """Malformed files and unknown names end the command with a SystemExit message (Python prints no traceback);
    tasks are resolved before any checkpoint is loaded."""
    from nanollada.cli import main
    root = tmp_path / "data"
    (root / "eval").mkdir(parents=True)
    write_jsonl(root / "eval" / "blimp.jsonl.gz", [{"phenomenon": "p", "good": "a b", "bad": "b a"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"good": "a", "bad": "b"}, {"good": "a"}])
    for tasks, message in ((["blimp", str(bad)], f"{bad}:2: "), (["nonesuch"], "known tasks: blimp"),
                           ([str(tmp_path / "missing.jsonl")], "task file not found")):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--ckpt", "unused.ckpt", "--data_root", str(root), "--tasks", *tasks])
        assert isinstance(e.value.code, str) and message in e.value.code
    with pytest.raises(SystemExit) as e:
        main(["eval", "--ckpt", str(tmp_path / "nope.ckpt"), "--data_root", str(root), "--tasks", "blimp"])
    assert "not found" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--ckpt", "x.ckpt", "--tasks", "blimp", "--samples", "0", "--data_root", str(root)])
    assert "samples must be >= 1" in str(e.value.code)


def test_multiple_choice_uses_choice_samples_and_the_cli_defaults_them_to_32(shipped_tokenizer, monkeypatch):
    """Choice families score with ``choice_samples`` draws (other families keep ``samples``); ``nanollada eval``
    without ``--samples`` gives 32 to multiple choice and 8 to the rest, and ``--samples N`` applies to all."""
    from dataclasses import replace

    from nanollada import commands
    tok = shipped_tokenizer
    loaded = crafted(tok, tok.encode("the dog ran"), False)
    mc = Task("mc", "multiple_choice", "x", [{"context": "Once upon a time", "choices": [" a cat", " the dog ran"],
                                             "gold": 1}])
    pairs = Task("bp", "minimal_pairs", "x", [{"good": "the dog ran", "bad": "dog the ran", "phenomenon": "p"}])
    s = replace(SETTINGS, samples=2, choice_samples=5)
    assert "5" in evaluate_task(loaded, mc, s)["estimate"] and "5" not in evaluate_task(loaded, pairs, s)["estimate"]
    assert "2" in evaluate_task(loaded, mc, replace(s, choice_samples=None))["estimate"]
    seen = []
    monkeypatch.setattr("nanollada.evaluation.runner.run_eval",
                        lambda ckpts, tasks, settings, *a, **k: seen.append(settings) or {})
    monkeypatch.setattr("nanollada.evaluation.tasks.resolve_task", lambda *a, **k: mc)
    for argv in (["--ckpt", "x", "--tasks", "mc"], ["--ckpt", "x", "--tasks", "mc", "--samples", "4"]):
        try:
            commands.eval_command(argv)
        except Exception:  # noqa: BLE001 - only the settings passed to run_eval matter here
            pass
    assert (seen[0].samples, seen[0].choice_samples) == (8, 32)
    assert (seen[1].samples, seen[1].choice_samples) == (4, 4)
