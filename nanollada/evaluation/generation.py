"""Generation quality against speed (``nanollada eval --generate``): every checkpoint generates for the same prompts
with every requested decoder setting, and each run is scored for quality and speed.

Per run (checkpoint x decoding strategy x sweep point):

- ``judge_ppl``: perplexity of the generated text under a judge checkpoint (``--judge``, e.g. the AR model of the
  same run): exp of the judge's NLL of the completion's tokens given the prompt, summed over all completions and
  divided by their tokens (``Paradigm.conditional_logprob``; exact for an AR judge). Low = fluent to the judge; a
  degenerate loop can also score low, so read it with the two repetition numbers.
- ``unigram_entropy``: entropy in bits of each completion's token distribution, averaged over completions (low =
  few distinct tokens).
- ``rep4``: repeated-4-gram rate, the share of a completion's token 4-grams that already occurred earlier in the same
  completion, pooled over completions (0 = no repetition, near 1 = a loop).
- ``mean_tokens``: mean answer length in tokens (cut at the stop token); ``empty``: completions with no token.
- ``tpf``: answer tokens per forward (AR: at most 1; diffusion: several where tokens are committed in parallel);
  ``tokens_per_s``: answer tokens per second of decoding (``Generation.seconds``, prompt processing included).

Every setting is explicit (temperature 0, top-p and repetition penalty off unless swept), so no paradigm default
applies silently. A sweep (``grid``: field -> values) runs each checkpoint's ``comparison_runs`` (AR once, diffusion
once per strategy) at every combination, skipping combinations the paradigm decodes identically
(``Paradigm.decoding_key``: an AR run ignores ``threshold``, a ``threshold`` run ignores ``steps``), so each
(checkpoint, strategy) is one curve. :func:`plot_sweep` draws quality against tokens/s (matplotlib, optional).
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from dataclasses import asdict, fields, replace
from pathlib import Path

from nanollada.data.records import SHARED_VAL_FRACTION, DataError, read_jsonl

PREFIX_CHARS = 120  # default length of a pretraining-text prefix used as a prompt


# ------------------------------------------------------------------------------------------------ prompts
def text_prefix(text: str, chars: int) -> str:
    """The first ``chars`` characters of ``text``, cut back to a word boundary when one is near (English)."""
    if len(text) <= chars:
        return text.strip()
    cut = text[:chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > chars * 2 // 3 else cut).strip()


def load_prompts(spec: str, limit: int | None = None, prefix_chars: int = PREFIX_CHARS,
                 root: str | None = None, val_fraction: float = SHARED_VAL_FRACTION) -> tuple[list[str], str]:
    """Prompts and a description of where they came from.

    ``spec``: a ``.txt`` file (one prompt per line); a ``.jsonl`` file with a ``"prompt"`` field; an SFT file
    (``{"conversations"}``: the first user turn); ``sft:<file>`` / ``sft-<name>`` (``<data_root>/sft/<name>.jsonl.gz``):
    the first user turns of the held-out conversations only (:func:`heldout_sft_prompts`); a pretrain file or ``ppl-<source>`` / ``ppl:<file>`` (the first
    ``prefix_chars`` characters of each validation record: the model continues real text). ``limit`` prompts spread
    evenly (``tasks.select_items``). ``val_fraction``: the held-out share of the SHA-1 rule for ``sft:`` and
    ``ppl:`` specs (the training config's ``data.val_fraction``)."""
    from nanollada.evaluation.tasks import data_root, resolve_task, select_items
    from nanollada.prediction import read_prompts
    if spec.startswith("sft:") or (spec.startswith("sft-") and not Path(spec).exists()):
        path = spec[4:] if spec.startswith("sft:") else str(data_root(root) / "sft" / f"{spec[4:]}.jsonl.gz")
        prompts = heldout_sft_prompts(path, val_fraction)
        chosen = [p["p"] for p in select_items([{"p": p} for p in prompts], limit)]
        return chosen, (f"first user turns of {len(chosen)} of the {len(prompts)} held-out conversations (SHA-1 "
                        f"rule, fraction {val_fraction:.4f}) of {path}")
    if spec.startswith("ppl") and (spec.startswith("ppl:") or not Path(spec).exists()):
        task = resolve_task(spec, root, limit, val_fraction=val_fraction)
        return [text_prefix(it["text"], prefix_chars) for it in task.items], \
            f"first {prefix_chars} characters of {len(task.items)} validation records of {task.path}"
    if not Path(spec).is_file():
        raise DataError(f"prompts file not found: {spec}")
    if spec.endswith(".txt"):
        prompts, how = read_prompts([], spec), "lines"
    else:
        prompts, how = [], None

        def parse(rec: dict) -> tuple[str, str]:
            if isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
                return "prompt", rec["prompt"]
            conv = rec.get("conversations")
            if isinstance(conv, list):
                for turn in conv:
                    if isinstance(turn, dict) and turn.get("role") == "user" and isinstance(turn.get("content"), str):
                        return "first user turns (SFT)", turn["content"]
                raise ValueError('"conversations" has no user turn')
            if isinstance(rec.get("text"), str) and rec["text"].strip():
                return f"first {prefix_chars} characters of pretraining records", text_prefix(rec["text"],
                                                                                             prefix_chars)
            raise ValueError('expected a "prompt", "conversations" (SFT) or "text" (pretrain) field')
        for _, (kind, prompt) in read_jsonl(spec, parse):
            prompts.append(prompt)
            how = how or kind
    if not prompts:
        raise DataError(f"{spec}: no prompts")
    prompts = [p["p"] for p in select_items([{"p": p} for p in prompts], limit)]
    return prompts, f"{how} of {spec} ({len(prompts)} prompts)"


def heldout_sft_prompts(path: str, val_fraction: float = SHARED_VAL_FRACTION) -> list[str]:
    """The first user turn of every held-out conversation of an SFT file: the records the SHA-1 rule
    (``is_validation(key, val_fraction)``, the SFT config's ``data.val_fraction``) keeps out of training, in
    file order."""
    from nanollada.data.records import is_validation, iter_records
    if not Path(path).is_file():
        raise DataError(f"SFT file not found: {path}")
    prompts = [next(t["content"] for t in rec["conversations"] if t.get("role") == "user")
               for key, rec in iter_records(path, "sft") if is_validation(key, val_fraction)]
    if not prompts:
        raise DataError(f"{path}: no held-out conversations (SHA-1 split rule, fraction {val_fraction:.4f}; "
                        "--val_fraction sets it)")
    return prompts


# ------------------------------------------------------------------------------------------------ metrics
def unigram_entropy(tokens: list[int]) -> float:
    """Entropy in bits of the token distribution of one completion (0 for an empty one)."""
    if not tokens:
        return 0.0
    n = len(tokens)
    return -sum(c / n * math.log2(c / n) for c in Counter(tokens).values())


def repeated_ngrams(tokens: list[int], n: int = 4) -> tuple[int, int]:
    """(n-grams that already occurred earlier in ``tokens``, all n-grams)."""
    seen, repeats = set(), 0
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats, len(grams)


def judge_perplexity(judge, prompts: list[str], completions: list[str], scoring) -> dict:
    """The judge's perplexity of the completions given their prompts (empty completions skipped)."""
    from nanollada.evaluation.runner import fit_length
    from nanollada.generate import encode_prompt
    iface, tok = judge.interface, judge.tokenizer
    ctxs, tgts = [], []
    for p, c in zip(prompts, completions):
        tgt = tok.encode(c)
        if not tgt:
            continue
        ctx, tgt, _ = fit_length(encode_prompt(iface, p, None), tgt, judge.model.cfg.max_seq_len)
        ctxs.append(ctx)
        tgts.append(tgt)
    if not ctxs:
        return {"judge_ppl": None, "judge_nats_per_token": None, "judge_tokens": 0}
    lp, n = iface.conditional_logprob(ctxs, tgts, scoring)
    nats = -float(lp.sum()) / max(int(n.sum()), 1)
    return {"judge_ppl": math.exp(min(nats, 700.0)), "judge_nats_per_token": nats, "judge_tokens": int(n.sum())}


def score_run(loaded, records: list[dict], judge=None, scoring=None) -> dict:
    """Quality and speed of one run's ``generate_text`` records (see the module docstring)."""
    tok = loaded.tokenizer
    ids = [tok.encode(r["completion"]) for r in records]
    reps = [repeated_ngrams(t) for t in ids]
    tokens = sum(r["tokens"] for r in records)
    forwards = sum(r["forwards"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    out = {"prompts": len(records), "mean_tokens": tokens / max(len(records), 1),
           "empty": sum(not r["completion"].strip() for r in records),
           "unigram_entropy": sum(map(unigram_entropy, ids)) / max(len(ids), 1),
           "rep4": sum(r for r, _ in reps) / max(sum(t for _, t in reps), 1),
           "tpf": tokens / max(forwards, 1), "tokens_per_s": tokens / max(seconds, 1e-9),
           "tokens": tokens, "forwards": forwards, "seconds": seconds}
    if judge is not None:
        out.update(judge_perplexity(judge, [r["prompt"] for r in records], [r["completion"] for r in records],
                                    scoring))
    return out


# ------------------------------------------------------------------------------------------------ the sweep
def parse_sweep(items: list[str]) -> dict[str, list]:
    """``["threshold=0.5,0.7", "steps=8,16"]`` -> ``{"threshold": [0.5, 0.7], "steps": [8, 16]}`` (values parsed as
    JSON, ``none`` = null); keys must be ``GenerationSettings`` fields."""
    from nanollada.generate import GenerationSettings
    known = {f.name for f in fields(GenerationSettings)}
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not values.strip():
            raise ValueError(f"--sweep {item!r}: expected FIELD=V1,V2,... (e.g. threshold=0.5,0.7,0.9)")
        if key not in known:
            raise ValueError(f"--sweep {item!r}: {key!r} is not a generation setting; known: {sorted(known)}")
        parsed = []
        for v in values.split(","):
            v = v.strip()
            try:
                parsed.append(None if v.lower() in ("none", "null") else json.loads(v))
            except json.JSONDecodeError:
                parsed.append(v)
        grid[key] = parsed
    return grid


def base_settings(max_new_tokens: int = 64, **overrides):
    """Deterministic decoding with every field explicit (temperature 0, top-p and repetition penalty off, no prefix
    cache), then ``overrides``."""
    from nanollada.generate import GenerationSettings
    base = dict(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
                strategy="low_confidence", use_prefix_cache=False, block_length=32)
    base.update(overrides)
    names = {f.name for f in fields(GenerationSettings)}
    return GenerationSettings(**{k: v for k, v in base.items() if k in names})


def run_sweep(models: list, labels: list[str], prompts: list[str], settings, strategies: list[str],
              grid: dict[str, list] | None = None, judge=None, scoring=None, log=print) -> dict:
    """Generate with every (checkpoint, strategy, sweep point) and score each run; JSON-ready result."""
    from nanollada.generate import generate_text
    from nanollada.paradigms.base import ScoringSettings
    scoring = scoring or ScoringSettings()
    grid = dict(grid or {})
    rows = []
    for loaded, label in zip(models, labels):
        iface = loaded.interface
        generate_text(loaded, prompts[0], replace(settings, max_new_tokens=2, block_length=2, steps=None))  # warm-up
        for run, run_settings in iface.comparison_runs(settings, strategies):
            seen = set()
            # the swept fields this decoder reads: changing them changes its decoding key
            ref = iface.decoding_key(run_settings)
            relevant = [f for f in grid if any(iface.decoding_key(replace(run_settings, **{f: v})) != ref
                                               for v in grid[f])]
            for combo in itertools.product(*grid.values()):
                s = replace(run_settings, **dict(zip(grid, combo)))
                point = {f: getattr(s, f) for f in relevant}
                key = iface.decoding_key(s)
                if key in seen:
                    continue
                seen.add(key)
                records = [generate_text(loaded, p, s) for p in prompts]
                row = {"checkpoint": label, "path": loaded.path, "paradigm": loaded.paradigm, "run": run,
                       "curve": f"{label} {run}", "point": point, "settings": asdict(s),
                       **score_run(loaded, records, judge, scoring),
                       "examples": [{"prompt": r["prompt"][:80], "completion": r["completion"][:160]}
                                    for r in records[:2]]}
                rows.append(row)
                log(f"[generate] {row['curve']} {point_label(point)}: {row['tokens_per_s']:.1f} tok/s, "
                    f"TPF {row['tpf']:.2f}, judge ppl {fmt(row.get('judge_ppl'))}, rep4 {row['rep4']:.2f}, "
                    f"entropy {row['unigram_entropy']:.2f} bits, {row['mean_tokens']:.1f} tokens")
    return {"prompts": len(prompts), "settings": asdict(settings), "strategies": list(strategies), "grid": grid,
            "judge": getattr(judge, "path", None), "rows": rows}


def fmt(v, spec: str = "{:.2f}") -> str:
    return "—" if v is None else spec.format(v)


def point_label(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "default"


SHORT = {"threshold": "t", "steps": "s", "block_length": "b", "temperature": "T", "max_new_tokens": "n"}


def short_label(point: dict) -> str:
    """``t0.5 b8`` for the plot's point labels."""
    return " ".join(f"{SHORT.get(k, k + '=')}{v}" for k, v in point.items())


def format_sweep(result: dict) -> str:
    """Markdown table: one row per run, curves together."""
    lines = ["| checkpoint / decoder | setting | tokens/s | TPF | judge ppl | rep-4gram | unigram entropy (bits) "
             "| mean tokens |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['curve']} | {point_label(r['point'])} | {r['tokens_per_s']:.1f} | {r['tpf']:.2f} | "
                     f"{fmt(r.get('judge_ppl'))} | {r['rep4']:.3f} | {r['unigram_entropy']:.2f} | "
                     f"{r['mean_tokens']:.1f} |")
    judge = result.get("judge")
    lines.append("")
    lines.append(f"{result['prompts']} prompts; judge: {judge or 'none (--judge not given)'}; every decoder "
                 "greedy unless a sweep sets a temperature.")
    return "\n".join(lines)


def plot_sweep(result: dict, path: str) -> str | None:
    """Quality (judge perplexity, or the repeated-4-gram rate without a judge) and repetition against tokens/s,
    one curve per checkpoint and strategy; returns the path, or None with a message when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[generate] matplotlib is not installed (pip install 'nanollada[plot]'): skipped the plot "
              f"{path}; the JSON table has every number")
        return None
    has_judge = any(r.get("judge_ppl") is not None for r in result["rows"])
    panels = [("judge_ppl", "judge perplexity (lower = more fluent)")] if has_judge else []
    panels.append(("rep4", "repeated 4-gram rate (lower = less looping)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    curves: dict[str, list[dict]] = {}
    for r in result["rows"]:
        curves.setdefault(r["curve"], []).append(r)
    for ax, (key, title) in zip(axes[0], panels):
        for i, (name, rows) in enumerate(curves.items()):  # one colour per curve in every panel
            rows = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r["tokens_per_s"])
            if not rows:
                continue
            ax.plot([r["tokens_per_s"] for r in rows], [r[key] for r in rows], marker="o", label=name,
                    color=f"C{i % 10}")
            for r in rows:
                if r["point"]:
                    ax.annotate(short_label(r["point"]), (r["tokens_per_s"], r[key]), fontsize=6,
                                textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        if key == "judge_ppl":
            ax.set_yscale("log")
        ax.set_xlabel("answer tokens / s (log)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"generation quality vs speed ({result['prompts']} prompts; point labels: "
                 + ", ".join(f"{v} = {k}" for k, v in SHORT.items() if k in result.get("grid", {})) + ")",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
