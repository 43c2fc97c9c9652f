"""Score checkpoints of either paradigm on the task families of ``tasks.py``; JSON results and a markdown table.

How each family is scored (all log-likelihoods in nats; ``bos`` starts every scored sequence):

- **perplexity** ``{"text"}``: the sequence is ``bos + text + eos``, cut to the model's ``max_seq_len``; everything
  after ``bos`` is scored. AR: exact NLL (``ar_sequence_logprob``). Diffusion: the Monte-Carlo negative ELBO
  (``diffusion_elbo``, ``samples`` draws, fixed seed), an upper bound on the NLL, so its perplexity is an upper bound.
- **minimal pairs** ``{"good", "bad"}``: the score of a sentence is its total log-likelihood given ``bos`` (no eos,
  the usual BLiMP convention). AR: exact; diffusion: minus the ELBO estimate, the good and the bad sentence of every
  pair scored with the same random numbers (same masking time and the same uniform draw per position: both batches
  are padded to one length and drawn from identically seeded generators), which removes most of the Monte-Carlo
  noise from the comparison. Accuracy = share of pairs with score(good) > score(bad), overall and per phenomenon.
- **multiple choice** ``{"query" | "context", "choices", "gold"}``: the prediction is the choice with the highest
  log p(target | context). With a ``context`` holding a ``#idiom#`` blank (ChID) each choice is substituted into the
  blank and the whole sentence is scored: context = ``bos`` + text before the blank, target = choice + text after
  it (the shared prefix cancels, so this ranks the choices by the likelihood of the whole filled-in sentence). A
  ``context`` without a blank is continued by the choice. A ``query`` (CMMLU) becomes the prompt
  ``QUERY_TEMPLATE.format(query=...)`` (``"问题：{query}\\n答案："``) and the target is the choice. ``accuracy``
  uses the summed log-likelihood, ``accuracy_norm`` the log-likelihood per target token. AR: exact; diffusion:
  LLaDA's conditional estimator (``diffusion_conditional_logprob``: stratified number of masked target tokens,
  ``samples`` draws, fixed seed).
- **cloze** ``{"context", "continuation"}``: the model greedily generates as many tokens as the continuation has
  (AR: ``ar_generate`` with the KV cache, temperature 0; diffusion: ``diffusion_generate`` with one block of that
  length, ``LowConfidence(steps=length)``, temperature 0); exact match compares the decoded text with the
  continuation (surrounding whitespace ignored). The continuation's log-likelihood is reported beside it.

Sequences longer than ``max_seq_len`` keep ``bos``, the end of the context and the start of the target (counted as
``truncated``). Scoring is batched and padded (``batch_size`` sequences per forward); items/s covers the scoring of
a task (tokenisation included, checkpoint loading excluded).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nanollada.evaluation.tasks import BLANK, Task
from nanollada.paradigms.base import ScoringSettings

QUERY_TEMPLATE = "问题：{query}\n答案："

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
def score_perplexity(loaded, task: Task, s: EvalSettings) -> dict:
    tok, iface = loaded.tokenizer, loaded.interface
    max_len = loaded.model.cfg.max_seq_len
    seqs = [[tok.bos_id] + ids + [tok.eos_id] for ids in tok.encode_batch([it["text"] for it in task.items])]
    truncated = sum(len(q) > max_len for q in seqs)
    nll, n = iface.sequence_nll([q[:max_len] for q in seqs], s)
    per_token = float(nll.sum()) / max(int(n.sum()), 1)
    return {"nats_per_token": per_token, "ppl": math.exp(min(per_token, 700.0)), "tokens": int(n.sum()),
            "estimate": iface.estimate("perplexity", s), "truncated": truncated}


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
        ctx = [tok.bos_id] + tok.encode(QUERY_TEMPLATE.format(query=item["query"]))
        return [(ctx, tok.encode(c)) for c in item["choices"]]
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
    return {"accuracy": sum(correct) / max(N, 1), "accuracy_norm": sum(correct_norm) / max(N, 1),
            "chance": task.chance, "groups": _accuracy_by_group(correct, groups), "truncated": truncated,
            "estimate": loaded.interface.estimate("multiple_choice", s)}


def score_cloze(loaded, task: Task, s: EvalSettings) -> dict:
    tok = loaded.tokenizer
    pairs = [([tok.bos_id] + tok.encode(it["context"]), tok.encode(it["continuation"])) for it in task.items]
    ctxs, tgts, truncated = _fit_all(pairs, loaded.model.cfg.max_seq_len)
    gens = loaded.interface.greedy_continuations(ctxs, [len(t) for t in tgts], s)
    correct = [tok.decode(g).strip() == it["continuation"].strip() for g, it in zip(gens, task.items)]
    lp, n = _conditional(loaded, ctxs, tgts, s)
    N = len(task.items)
    return {"exact_match": sum(correct) / max(N, 1), "logprob_per_item": sum(lp) / max(N, 1),
            "logprob_per_token": sum(lp) / max(sum(n), 1), "tokens": int(sum(n)), "truncated": truncated,
            "examples": [{"context": it["context"][-80:], "continuation": it["continuation"],
                          "generated": tok.decode(g)} for it, g in list(zip(task.items, gens))[:3]]}


SCORERS = {"perplexity": score_perplexity, "minimal_pairs": score_minimal_pairs,
           "multiple_choice": score_multiple_choice, "cloze": score_cloze}


@torch.no_grad()
def evaluate_task(loaded, task: Task, settings: EvalSettings) -> dict:
    """Score one loaded checkpoint on one task: the family's metrics plus items, seconds and items_per_s."""
    device = _device(loaded.model)
    _sync(device)
    start = time.perf_counter()
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
             log=print) -> dict:
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
            r = per_task[t.name] = evaluate_task(loaded, t, settings)
            log(f"[eval] {label} ({loaded.paradigm}) {t.name}: {_summary(r)} "
                f"[{r['items']} items, {r['seconds']:.1f}s, {r['items_per_s']:.1f} items/s]")
        del loaded
    return result


def _summary(r: dict) -> str:
    if r["family"] == "perplexity":
        return f"{r['nats_per_token']:.3f} nats/token, ppl {r['ppl']:.2f}"
    if r["family"] == "minimal_pairs":
        return f"accuracy {r['accuracy']:.1%}"
    if r["family"] == "multiple_choice":
        return f"accuracy {r['accuracy']:.1%}, length-normalised {r['accuracy_norm']:.1%}"
    return f"exact match {r['exact_match']:.1%}, {r['logprob_per_token']:.3f} nats/token"


# ------------------------------------------------------------------------------------------------ markdown
METRIC_ROWS = {
    "perplexity": [("nats/token", "nats_per_token", "{:.3f}"), ("perplexity", "ppl", "{:.2f}"),
                   ("tokens", "tokens", "{:d}")],
    "minimal_pairs": [("accuracy", "accuracy", "{:.1%}")],
    "multiple_choice": [("accuracy", "accuracy", "{:.1%}"), ("accuracy (per-token norm.)", "accuracy_norm",
                                                                  "{:.1%}")],
    "cloze": [("exact match", "exact_match", "{:.1%}"), ("log-lik./token", "logprob_per_token", "{:.3f}")],
}


def _chance(task: dict, metric: str, checkpoints: list[dict]) -> str:
    if metric in ("accuracy", "accuracy_norm") and task["chance"] is not None:
        return f"{task['chance']:.1%}"
    vocab = {c["vocab_size"] for c in checkpoints}
    if task["family"] == "perplexity" and len(vocab) == 1 and metric in ("nats_per_token", "ppl"):
        v = vocab.pop()  # a uniform guess over the vocabulary
        return f"{math.log(v):.3f}" if metric == "nats_per_token" else f"{v}"
    if task["family"] == "cloze" and metric == "exact_match":
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
                v = result["results"][c["label"]][t["name"]].get(key)
                cells.append("" if v is None else fmt.format(v))
            lines.append(f"| {name} | {title} | " + " | ".join(cells) + f" | {_chance(t, key, cks)} |")
            name = ""
    s = result["settings"]
    notes = [f"AR: exact log-likelihoods. Diffusion: perplexity from the negative ELBO (an upper bound), pair and "
             f"choice scores Monte-Carlo estimates ({s['samples']} samples, seed {s['seed']}). Chance for "
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
