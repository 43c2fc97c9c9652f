"""Score checkpoints of either paradigm on the task families of ``tasks.py``; JSON results and a markdown table.

How each family is scored (all log-likelihoods in nats; ``bos`` starts every scored sequence):

- **perplexity** ``{"text"}``: the sequence is ``bos + text + eos``; everything after ``bos`` is scored
  (``Paradigm.rolling_nll``). A sequence that fits the model's ``max_seq_len`` is scored whole: AR exact NLL
  (``ar_sequence_logprob``), diffusion the Monte-Carlo negative ELBO (``diffusion_elbo``, ``samples`` draws, fixed
  seed), an upper bound on the NLL, so its perplexity is an upper bound. A longer one is scored in windows
  (``paradigms.base.rolling_windows``): the first ``max_seq_len`` tokens, then ``stride`` new tokens per window
  (default ``max_seq_len // 2``) after bos and the tokens just before them; every token is scored once (AR exact
  given its window, diffusion the conditional estimator per window, still a bound). ``windowed`` counts them.
- **rolling perplexity** (a ``.txt`` file, WikiText-style): every document (blank-line or heading split,
  ``tasks.split_documents``) is ``bos + text`` (no eos, as lm-evaluation-harness's ``loglikelihood_rolling``),
  scored as above. Reported: nats/token and token perplexity, word perplexity exp(NLL / words) with words =
  whitespace-separated pieces (lm-eval's count; meaningless for Chinese), byte perplexity exp(NLL / UTF-8 bytes) and
  bits per byte.
- **minimal pairs** ``{"good", "bad"}``: the score of a sentence is its total log-likelihood given ``bos`` (no eos,
  the usual BLiMP convention). AR: exact; diffusion: minus the ELBO estimate, the good and the bad sentence of every
  pair scored with the same random numbers (same masking time and the same uniform draw per position: both batches
  are padded to one length and drawn from identically seeded generators), which removes most of the Monte-Carlo
  noise from the comparison. Accuracy = share of pairs with score(good) > score(bad), overall and per phenomenon.
- **multiple choice** ``{"query" | "context", "choices", "gold"}``: the prediction is the choice with the highest
  log p(target | context). With a ``context`` holding a ``#idiom#`` blank (ChID) each choice is substituted into the
  blank and the whole sentence is scored: context = ``bos`` + text before the blank, target = choice + text after
  it (the shared prefix cancels, so this ranks the choices by the likelihood of the whole filled-in sentence). A
  ``context`` without a blank is continued by the choice. A ``query`` (CMMLU) becomes the prompt of its language
  (``tasks.QUERY_TEMPLATES``, chosen per item by ``tasks.query_language`` or its ``"language"`` field): Chinese
  ``"问题：{query}\\n答案："`` + choice, English ``"Question: {query}\\nAnswer:"`` + ``" "`` + choice; the templates
  used are printed and stored in the task's ``query_templates``. ``accuracy``
  uses the summed log-likelihood, ``accuracy_norm`` the log-likelihood per target token. AR: exact; diffusion:
  LLaDA's conditional estimator (``diffusion_conditional_logprob``: stratified number of masked target tokens,
  ``samples`` draws, fixed seed).
- **context choice** ``{"context_options", "continuation", "gold"}`` (Winogrande partial scoring): the prediction
  is the option o maximising log p(continuation | bos + o); the choices of an item share their Monte-Carlo draws.
- **cloze** ``{"context", "continuation"}`` (LAMBADA-style last word): ``exact_match`` is the share of items whose
  greedy continuation of exactly the continuation's token length (``Paradigm.greedy_continuations``: AR argmax with
  the KV cache; diffusion one block of that length, ``LowConfidence(steps=length)``, temperature 0) decodes to the
  continuation (surrounding whitespace ignored). ``decoders`` repeats it for every decoder of the paradigm
  (``Paradigm.comparison_runs`` over ``strategies``: AR once, diffusion once per strategy) through
  ``Paradigm.generate`` at temperature 0 with ``max_new_tokens`` = block = steps = the continuation's length,
  stopping at eos, with forwards and tokens per forward. The continuation's log-likelihood is reported beside it.
- **preference** ``{"chosen", "rejected"}`` (MiniMind's ``dpo.jsonl``; ``pref-<source>`` picks the held-out pairs):
  the prompt is the shared messages rendered with the chat template plus the open assistant header, each target a
  last assistant turn + ``<|im_end|>`` (``data.preference.render_preference``, exactly what DPO trains on; a pair
  longer than ``max_seq_len`` is cut with the prompt kept shared, ``truncate_pair``). Both responses are scored with
  ``Paradigm.conditional_logprob`` (the pair as one group: diffusion's estimator scores them on shared draws).
  ``accuracy`` is the share of pairs whose chosen response has the higher **per-token** (length-normalised)
  log-likelihood; ``accuracy_sum`` uses the summed log-likelihood (which favours the shorter response);
  ``margin_per_token`` is the mean chosen-minus-rejected per-token log-likelihood.

In the choice and cloze families, sequences longer than ``max_seq_len`` keep ``bos``, the end of the context and the
start of the target (counted as ``truncated`` and printed beside the score). Scoring is batched and padded
(``batch_size`` sequences per forward); items/s covers the scoring of a task (tokenisation included, checkpoint
loading excluded).
"""

from __future__ import annotations

import math
import time
import re
from dataclasses import asdict, replace
from pathlib import Path

import torch

from nanollada.evaluation.tasks import BLANK, QUERY_TEMPLATES, Task, query_language
from nanollada.paradigms.base import ScoringSettings, rolling_windows

QUERY_TEMPLATE = QUERY_TEMPLATES["zh"][0]  # the Chinese query prompt (English: QUERY_TEMPLATES["en"])

EvalSettings = ScoringSettings  # the name the CLI and tests use


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_length(ctx: list[int], tgt: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Cut context + target to ``max_len`` tokens: keep the context's first token (bos), the end of the context and
    the start of the target (the target keeps at least max_len - 1 tokens). Returns (ctx, tgt, truncated)."""
    if len(ctx) + len(tgt) <= max_len:
        return ctx, tgt, False
    tgt = tgt[: max_len - 1]
    room = max_len - len(tgt)  # >= 1
    ctx = ctx[:1] + ctx[len(ctx) - (room - 1):] if room > 1 else ctx[:1]
    return ctx, tgt, True


# ------------------------------------------------------------------------------------------------ the families
def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))


def _rolling(loaded, rows: list[list[int]], s: EvalSettings) -> dict:
    """NLL of bos-first rows of any length (windows past ``max_seq_len``) and the window bookkeeping."""
    max_len = loaded.model.cfg.max_seq_len
    nll, n = loaded.interface.rolling_nll(rows, s)
    windows = sum(len(rolling_windows(r, max_len, s.stride)) for r in rows)
    return {"nll": float(nll.sum()), "tokens": int(n.sum()), "windowed": sum(len(r) > max_len for r in rows),
            "windows": windows, "stride": s.stride or max(1, max_len // 2), "max_seq_len": max_len}


def score_perplexity(loaded, task: Task, s: EvalSettings) -> dict:
    tok, iface = loaded.tokenizer, loaded.interface
    seqs = [[tok.bos_id] + ids + [tok.eos_id] for ids in tok.encode_batch([it["text"] for it in task.items])]
    r = _rolling(loaded, seqs, s)
    per_token = r.pop("nll") / max(r["tokens"], 1)
    return {"nats_per_token": per_token, "ppl": _exp(per_token), **r, "truncated": 0,
            "estimate": iface.estimate("perplexity", s)}


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity: pieces between runs of whitespace."""
    return len(re.split(r"\s+", text))


def score_rolling_perplexity(loaded, task: Task, s: EvalSettings) -> dict:
    tok, iface = loaded.tokenizer, loaded.interface
    texts = [it["text"] for it in task.items]
    r = _rolling(loaded, [[tok.bos_id] + ids for ids in tok.encode_batch(texts)], s)
    nll = r.pop("nll")
    words, n_bytes = sum(map(count_words, texts)), sum(len(t.encode("utf-8")) for t in texts)
    return {"nats_per_token": nll / max(r["tokens"], 1), "ppl": _exp(nll / max(r["tokens"], 1)),
            "word_perplexity": _exp(nll / max(words, 1)), "byte_perplexity": _exp(nll / max(n_bytes, 1)),
            "bits_per_byte": nll / max(n_bytes, 1) / math.log(2), **r, "words": words, "bytes": n_bytes,
            "documents": len(texts), "nll": nll, "estimate": iface.estimate("perplexity", s)}


def _accuracy_by_group(correct: list[bool], groups: list[str | None]) -> dict:
    out: dict[str, list[int]] = {}
    for c, gname in zip(correct, groups):
        if gname is not None:
            out.setdefault(gname, []).append(int(c))
    return {k: {"accuracy": sum(v) / len(v), "items": len(v)} for k, v in out.items()}


def score_minimal_pairs(loaded, task: Task, s: EvalSettings) -> dict:
    tok, iface = loaded.tokenizer, loaded.interface
    max_len = loaded.model.cfg.max_seq_len
    good = [([tok.bos_id] + ids)[:max_len] for ids in tok.encode_batch([it["good"] for it in task.items])]
    bad = [([tok.bos_id] + ids)[:max_len] for ids in tok.encode_batch([it["bad"] for it in task.items])]
    N = len(good)
    sg, sb = iface.pair_logprobs(good, bad, s)
    correct = (sg > sb).tolist()
    groups = [it.get("phenomenon") for it in task.items]
    return {"accuracy": sum(correct) / max(N, 1), "chance": 0.5, "groups": _accuracy_by_group(correct, groups),
            "ties": int((sg == sb).sum()), "estimate": iface.estimate("minimal_pairs", s)}


def choice_pairs(tok, item: dict) -> list[tuple[list[int], list[int]]]:
    """(context ids, target ids) for every choice of a multiple-choice item (see the module docstring)."""
    if "query" in item:
        template, delimiter = QUERY_TEMPLATES[query_language(item)]
        ctx = [tok.bos_id] + tok.encode(template.format(query=item["query"]))
        return [(ctx, tok.encode(delimiter + c)) for c in item["choices"]]
    text = item["context"]
    if BLANK in text:
        before, after = text.split(BLANK, 1)
        ctx = [tok.bos_id] + tok.encode(before)
        return [(ctx, tok.encode(c + after)) for c in item["choices"]]
    ctx = [tok.bos_id] + tok.encode(text)
    return [(ctx, tok.encode(c)) for c in item["choices"]]


def _conditional(loaded, ctxs: list[list[int]], tgts: list[list[int]], s: EvalSettings,
                 groups: list[int] | None = None) -> tuple[list[float], list[int]]:
    """log p(target | context) and target token counts, through the checkpoint's paradigm interface."""
    lp, n = loaded.interface.conditional_logprob(ctxs, tgts, s, groups=groups)
    return lp.tolist(), n.tolist()


def _fit_all(pairs, max_len):
    ctxs, tgts, truncated = [], [], 0
    for c, t in pairs:
        c, t, cut = fit_length(c, t, max_len)
        ctxs.append(c)
        tgts.append(t)
        truncated += cut
    return ctxs, tgts, truncated


def score_multiple_choice(loaded, task: Task, s: EvalSettings) -> dict:
    tok, model = loaded.tokenizer, loaded.model
    pairs, owner = [], []
    for i, it in enumerate(task.items):
        for p in choice_pairs(tok, it):
            pairs.append(p)
            owner.append(i)
    ctxs, tgts, truncated = _fit_all(pairs, model.cfg.max_seq_len)
    lp, n = _conditional(loaded, ctxs, tgts, s, groups=owner)
    correct, correct_norm, pos = [], [], 0
    for it in task.items:
        k = len(it["choices"])
        raw = lp[pos: pos + k]
        norm = [v / max(c, 1) for v, c in zip(raw, n[pos: pos + k])]
        correct.append(max(range(k), key=raw.__getitem__) == it["gold"])
        correct_norm.append(max(range(k), key=norm.__getitem__) == it["gold"])
        pos += k
    N = len(task.items)
    groups = [it.get("subject") for it in task.items]
    out = {"accuracy": sum(correct) / max(N, 1), "accuracy_norm": sum(correct_norm) / max(N, 1),
           "chance": task.chance, "groups": _accuracy_by_group(correct, groups), "truncated": truncated,
           "estimate": loaded.interface.estimate("multiple_choice", s)}
    if "query_templates" in task.notes:
        out["query_templates"] = task.notes["query_templates"]
    return out


def score_context_choice(loaded, task: Task, s: EvalSettings) -> dict:
    tok = loaded.tokenizer
    pairs, owner = [], []
    for i, it in enumerate(task.items):
        cont = tok.encode(it["continuation"])
        for option in it["context_options"]:
            pairs.append(([tok.bos_id] + tok.encode(option), cont))
            owner.append(i)
    ctxs, tgts, truncated = _fit_all(pairs, loaded.model.cfg.max_seq_len)
    lp, _ = _conditional(loaded, ctxs, tgts, s, groups=owner)
    correct, pos = [], 0
    for it in task.items:
        k = len(it["context_options"])
        correct.append(max(range(k), key=lp[pos: pos + k].__getitem__) == it["gold"])
        pos += k
    return {"accuracy": sum(correct) / max(len(correct), 1), "chance": task.chance, "truncated": truncated,
            "estimate": loaded.interface.estimate("multiple_choice", s)}


def cloze_generation_settings(length: int):
    """Deterministic decoding of ``length`` tokens in one block (every field explicit, so no paradigm default
    applies): temperature 0, top-p and repetition penalty off, ``steps`` = ``block_length`` = ``length``."""
    from nanollada.generate import GenerationSettings
    return GenerationSettings(max_new_tokens=length, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
                              strategy="low_confidence", steps=length, block_length=length, use_prefix_cache=False,
                              chat=False)


def _decoder_matches(loaded, ctxs, tgts, items, strategies: list[str]) -> dict:
    """Exact match, forwards and tokens per forward of every decoder ``comparison_runs`` gives this paradigm."""
    from dataclasses import replace
    tok, iface = loaded.tokenizer, loaded.interface
    runs = iface.comparison_runs(cloze_generation_settings(1), list(strategies))
    out = {}
    for label, base in runs:
        hits, forwards, tokens, seconds = 0, 0, 0, 0.0
        for ctx, tgt, it in zip(ctxs, tgts, items):
            L = len(tgt)
            g = iface.generate(ctx, replace(base, max_new_tokens=L, steps=L, block_length=L))
            hits += tok.decode(g.tokens[:L]).strip() == it["continuation"].strip()
            forwards, tokens, seconds = forwards + g.forwards, tokens + len(g.tokens), seconds + g.seconds
        out[label] = {"exact_match": hits / max(len(items), 1), "forwards": forwards,
                      "tokens_per_forward": tokens / max(forwards, 1), "seconds": seconds}
    return out


def score_cloze(loaded, task: Task, s: EvalSettings, strategies: list[str] | None = None) -> dict:
    tok = loaded.tokenizer
    pairs = [([tok.bos_id] + tok.encode(it["context"]), tok.encode(it["continuation"])) for it in task.items]
    ctxs, tgts, truncated = _fit_all(pairs, loaded.model.cfg.max_seq_len)
    gens = loaded.interface.greedy_continuations(ctxs, [len(t) for t in tgts], s)
    correct = [tok.decode(g).strip() == it["continuation"].strip() for g, it in zip(gens, task.items)]
    lp, n = _conditional(loaded, ctxs, tgts, s)
    N = len(task.items)
    out = {"exact_match": sum(correct) / max(N, 1), "logprob_per_item": sum(lp) / max(N, 1),
           "logprob_per_token": sum(lp) / max(sum(n), 1), "tokens": int(sum(n)), "truncated": truncated,
           "estimate": loaded.interface.estimate("cloze", s),
           "examples": [{"context": it["context"][-80:], "continuation": it["continuation"],
                         "generated": tok.decode(g)} for it, g in list(zip(task.items, gens))[:3]]}
    if strategies:
        out["decoders"] = _decoder_matches(loaded, ctxs, tgts, task.items, strategies)
    return out


def score_preference(loaded, task: Task, s: EvalSettings) -> dict:
    from nanollada.data.preference import render_preference
    tok, max_len = loaded.tokenizer, loaded.model.cfg.max_seq_len
    ctxs, tgts, owner, truncated = [], [], [], 0
    for i, it in enumerate(task.items):
        prompt, chosen, rejected, cut = render_preference(tok, it, max_len)
        truncated += 2 * cut  # sequences, as the other families count them
        for response in (chosen, rejected):
            ctxs.append(prompt)
            tgts.append(response)
            owner.append(i)
    lp, n = _conditional(loaded, ctxs, tgts, s, groups=owner)
    norm = [v / max(c, 1) for v, c in zip(lp, n)]
    N = len(task.items)
    correct = [norm[2 * i] > norm[2 * i + 1] for i in range(N)]
    correct_sum = [lp[2 * i] > lp[2 * i + 1] for i in range(N)]
    return {"accuracy": sum(correct) / max(N, 1), "accuracy_sum": sum(correct_sum) / max(N, 1), "chance": 0.5,
            "margin_per_token": sum(norm[2 * i] - norm[2 * i + 1] for i in range(N)) / max(N, 1),
            "ties": sum(norm[2 * i] == norm[2 * i + 1] for i in range(N)), "truncated": truncated,
            "normalisation": "per_token", "estimate": loaded.interface.estimate("preference", s)}


SCORERS = {"perplexity": score_perplexity, "minimal_pairs": score_minimal_pairs,
           "multiple_choice": score_multiple_choice, "context_choice": score_context_choice, "cloze": score_cloze,
           "rolling_perplexity": score_rolling_perplexity, "preference": score_preference}


CHOICE_FAMILIES = ("multiple_choice", "context_choice")  # scored with ScoringSettings.choice_samples when set


def default_cloze_strategies() -> list[str]:
    """Every registered diffusion decoding strategy (AR runs its one decoder whatever the list)."""
    from nanollada.sampling.diffusion import STRATEGIES
    return sorted(STRATEGIES)


@torch.no_grad()
def evaluate_task(loaded, task: Task, settings: EvalSettings, strategies: list[str] | None = None) -> dict:
    """Score one loaded checkpoint on one task: the family's metrics plus items, seconds and items_per_s.
    ``strategies``: the decoders of the cloze family (None: every registered strategy; ``[]``: only the greedy
    continuation)."""
    device = _device(loaded.model)
    if task.family in CHOICE_FAMILIES and settings.choice_samples is not None:
        settings = replace(settings, samples=settings.choice_samples)
    _sync(device)
    start = time.perf_counter()
    if task.family == "cloze":
        metrics = score_cloze(loaded, task, settings, default_cloze_strategies() if strategies is None else strategies)
    else:
        metrics = SCORERS[task.family](loaded, task, settings)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"task": task.name, "family": task.family, "items": len(task.items), "seconds": seconds,
            "items_per_s": len(task.items) / max(seconds, 1e-9), **metrics}


# ------------------------------------------------------------------------------------------------ many checkpoints
def checkpoint_labels(paths: list[str]) -> list[str]:
    """The shortest trailing path parts that tell the checkpoints apart (``a/x/last.ckpt``, ``b/x/last.ckpt``)."""
    parts = [Path(p).parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{p}" for i, p in enumerate(paths)]


def run_eval(checkpoints: list[str], tasks: list[Task], settings: EvalSettings, device: str, load,
             log=print, strategies: list[str] | None = None) -> dict:
    """Score every checkpoint on every task. ``load(path, device)`` -> LoadedModel. Returns JSON-ready results."""
    labels = checkpoint_labels(checkpoints)
    result = {"settings": asdict(settings), "device": str(device),
              "tasks": [{"name": t.name, "family": t.family, "path": t.path, "items": len(t.items),
                         "available": t.total, "chance": t.chance, **t.notes} for t in tasks],
              "checkpoints": [], "results": {}}
    for label, path in zip(labels, checkpoints):
        loaded = load(path, device)
        cfg = loaded.model.cfg
        result["checkpoints"].append({"label": label, "path": str(path), "paradigm": loaded.paradigm,
                                      "is_chat": loaded.is_chat, "params": loaded.model.num_params(),
                                      "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len})
        per_task = result["results"][label] = {}
        for t in tasks:
            r = per_task[t.name] = evaluate_task(loaded, t, settings, strategies)
            log(f"[eval] {label} ({loaded.paradigm}) {t.name}: {_summary(r, cfg.vocab_size)} "
                f"[{r['items']} items, {r['seconds']:.1f}s, {r['items_per_s']:.1f} items/s]")
        del loaded
    return result


def _summary(r: dict, vocab_size: int | None = None) -> str:
    """One line per result, with the chance level (uniform guessing) and any truncation beside the score."""
    fam = r["family"]
    if fam in ("perplexity", "rolling_perplexity"):
        text = f"{r['nats_per_token']:.3f} nats/token, ppl {r['ppl']:.2f}"
        if fam == "rolling_perplexity":
            text += (f", word ppl {r['word_perplexity']:.2f}, byte ppl {r['byte_perplexity']:.3f}, "
                     f"{r['bits_per_byte']:.3f} bits/byte")
        if vocab_size:
            text += f" (chance: ppl {vocab_size}, a uniform guess over the vocabulary)"
        if r.get("windowed"):
            text += f"; {r['windowed']} longer than {r['max_seq_len']} tokens scored in windows, stride {r['stride']}"
    elif fam == "cloze":
        text = f"exact match {r['exact_match']:.1%} (chance ~0%), {r['logprob_per_token']:.3f} nats/token"
        if r.get("decoders"):
            text += "; per decoder: " + ", ".join(f"{k} {v['exact_match']:.1%} ({v['tokens_per_forward']:.2f} TPF)"
                                                 for k, v in r["decoders"].items())
    elif fam == "preference":
        text = (f"accuracy {r['accuracy']:.1%} (chosen more likely per token; summed log-likelihood "
                f"{r['accuracy_sum']:.1%}) (chance {r['chance']:.1%})")
    else:
        text = f"accuracy {r['accuracy']:.1%}"
        if fam == "multiple_choice":
            text += f", length-normalised {r['accuracy_norm']:.1%}"
        text += f" (chance {r['chance']:.1%})"
    if r.get("truncated"):
        text += f"; {r['truncated']} sequences cut to max_seq_len (kept: bos, end of context, start of target)"
    return text


# ------------------------------------------------------------------------------------------------ markdown
METRIC_ROWS = {
    "perplexity": [("nats/token", "nats_per_token", "{:.3f}"), ("perplexity", "ppl", "{:.2f}"),
                   ("tokens", "tokens", "{:d}")],
    "minimal_pairs": [("accuracy", "accuracy", "{:.1%}")],
    "multiple_choice": [("accuracy", "accuracy", "{:.1%}"), ("accuracy (per-token norm.)", "accuracy_norm",
                                                                  "{:.1%}")],
    "context_choice": [("accuracy", "accuracy", "{:.1%}")],
    "preference": [("accuracy (per-token norm.)", "accuracy", "{:.1%}"), ("accuracy (summed)", "accuracy_sum",
                                                                          "{:.1%}"),
                   ("margin nats/token", "margin_per_token", "{:.3f}")],
    "cloze": [("exact match", "exact_match", "{:.1%}"), ("log-lik./token", "logprob_per_token", "{:.3f}"),
              ("exact match per decoder", "decoders", "{}")],
    "rolling_perplexity": [("nats/token", "nats_per_token", "{:.3f}"), ("perplexity (token)", "ppl", "{:.2f}"),
                           ("word perplexity", "word_perplexity", "{:.2f}"),
                           ("byte perplexity", "byte_perplexity", "{:.3f}"), ("bits/byte", "bits_per_byte", "{:.3f}"),
                           ("tokens", "tokens", "{:d}")],
}


def _cell(value, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):  # the cloze decoders: "label 12.0%, ..."
        return ", ".join(f"{k} {v['exact_match']:.1%}" for k, v in value.items())
    return fmt.format(value)


def _chance(task: dict, metric: str, checkpoints: list[dict]) -> str:
    if metric in ("accuracy", "accuracy_norm", "accuracy_sum") and task["chance"] is not None:
        return f"{task['chance']:.1%}"
    vocab = {c["vocab_size"] for c in checkpoints}
    if task["family"] in ("perplexity", "rolling_perplexity") and len(vocab) == 1 and metric in ("nats_per_token",
                                                                                                  "ppl"):
        v = vocab.pop()  # a uniform guess over the vocabulary
        return f"{math.log(v):.3f}" if metric == "nats_per_token" else f"{v}"
    if task["family"] == "cloze" and metric in ("exact_match", "decoders"):
        return "—"
    return ""


def format_markdown(result: dict, groups: bool = True) -> str:
    """One side-by-side table: rows = task / metric, columns = checkpoints, plus chance; then per-group accuracy."""
    cks = result["checkpoints"]
    head = [f"{c['label']} ({c['paradigm']})" for c in cks]
    lines = ["| task | metric | " + " | ".join(head) + " | chance |", "|---|---|" + "---|" * len(head) + "---|"]
    for t in result["tasks"]:
        name = f"{t['name']} ({t['items']})"
        for title, key, fmt in METRIC_ROWS[t["family"]] + [("items/s", "items_per_s", "{:.1f}")]:
            cells = []
            for c in cks:
                cells.append(_cell(result["results"][c["label"]][t["name"]].get(key), fmt))
            lines.append(f"| {name} | {title} | " + " | ".join(cells) + f" | {_chance(t, key, cks)} |")
            name = ""
    s = result["settings"]
    notes = [f"AR: exact log-likelihoods. Diffusion: perplexity from the negative ELBO (an upper bound), pair and "
             f"choice scores Monte-Carlo estimates ({s['samples']} samples"
             + (f", {s['choice_samples']} for multiple choice" if s.get("choice_samples") not in (None, s["samples"])
                else "") + f", seed {s['seed']}). Chance for "
             "perplexity rows: a uniform guess over the vocabulary."]
    out = "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"
    if groups:
        for t in result["tasks"]:
            names = []
            for c in cks:
                for g in result["results"][c["label"]][t["name"]].get("groups", {}):
                    if g not in names:
                        names.append(g)
            if len(names) < 2:
                continue
            out += (f"\n### {t['name']}: accuracy per {'phenomenon' if t['family'] == 'minimal_pairs' else 'group'}"
                    f"\n\n| group | items | " + " | ".join(head) + " |\n|---|---|" + "---|" * len(head) + "\n")
            for g in names:
                cells, n = [], ""
                for c in cks:
                    r = result["results"][c["label"]][t["name"]]["groups"].get(g)
                    cells.append("" if r is None else f"{r['accuracy']:.1%}")
                    n = r["items"] if r else n
                out += f"| {g} | {n} | " + " | ".join(cells) + " |\n"
    return out
