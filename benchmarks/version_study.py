#!/usr/bin/env python
"""Versioned comparison v0.1 / 2.0 / 2.1 on one run's checkpoints: quality and speed of each version's decoder.

The versions (checkpoints of one ``nanollada pipeline`` run, ``--run``, default ``logs/real_cpu``):

- **v0.1** (LLaDA 1.0, what the seed report built): ``diffusion_sft``, low-confidence remasking with one token per
  step in semi-autoregressive blocks of 32 (LLaDA's ``generate.py``), greedy, prefix cache;
- **2.0** (block diffusion): ``block_diffusion_sft``, confidence-threshold commits (``--threshold``) in blocks of
  the trained size with the exact cache of finished blocks;
- **2.1 speedy / quality** (token editing): ``block_diffusion_editing_sft`` with the ``speedy`` (tau_mask 0.5,
  tau_edit 0.0) and ``quality`` (0.7, 0.5) presets;
- and the AR SFT model as the reference (KV cache, greedy).

Quality: each version answers the same held-out SFT prompts (``--prompts``, default the first user turns of the
held-out alpaca-en and alpaca-zh conversations, ``--limit`` of each) with ``--max_new_tokens``; the answers are
scored as ``nanollada eval --generate`` scores them (``evaluation.generation.score_run``): perplexity under the AR SFT
model of the same run (the judge), repeated-4-gram rate, unigram entropy, mean length, empty answers, tokens per
forward. Two answers of each are kept verbatim.

Speed: every version decodes ``--gen`` tokens after the same ``--prompt-len``-token prompts (the starts of held-out
en-gutenberg records) at batch 1 and 8 with eos ignored, so every row produces exactly ``--gen`` tokens
(``Paradigm.decode(stop=False)``); TPF = generated tokens per row / forwards, tokens/s = all rows' tokens / seconds
(median of ``--repeats``, the versions alternated within each repeat so load changes hit them alike).

    python benchmarks/version_study.py --run logs/real_cpu --out logs/real_cpu/version_study

Writes ``results.json`` and ``results.md`` under ``--out``. The likelihood tasks of ``nanollada eval`` for the same
checkpoints are in the run's ``eval/eval.md`` (the pipeline's eval stage).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass
class Version:
    """One row of the comparison: a label, the run's stage whose ``last.ckpt`` it uses, and its decoding."""

    label: str
    stage: str
    settings: dict  # GenerationSettings fields on top of the greedy base


def versions(threshold: float) -> list[Version]:
    return [
        Version("AR SFT (reference)", "ar_sft", {}),
        Version("v0.1 masked diffusion, low-confidence", "diffusion_sft",
                {"strategy": "low_confidence", "block_length": 32, "use_prefix_cache": True}),
        Version("2.0 block diffusion, threshold", "block_diffusion_sft", {"strategy": "threshold",
                                                                         "threshold": threshold}),
        Version("2.1 editing, speedy", "block_diffusion_editing_sft", {"editing": "speedy"}),
        Version("2.1 editing, quality", "block_diffusion_editing_sft", {"editing": "quality"}),
    ]


def settings_for(version: Version, max_new_tokens: int, loaded):
    """Greedy ``GenerationSettings`` with the version's fields, resolved with its paradigm's defaults (the
    low-confidence run takes one step per token: ``steps`` = ``max_new_tokens``)."""
    from nanollada.evaluation.generation import base_settings
    fields = dict(version.settings)
    if fields.get("strategy") == "low_confidence":
        fields["steps"] = max_new_tokens
    s = base_settings(max_new_tokens, **fields)
    return s.resolve(loaded.interface.default_generation())


def speed_prompts(tok, data_root: Path, length: int, n: int) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` tokens: bos + the start of held-out en-gutenberg records."""
    from nanollada.data.records import SHARED_VAL_FRACTION, is_validation, iter_records
    prompts = []
    for key, rec in iter_records(str(data_root / "pretrain" / "en-gutenberg.jsonl.gz"), "pretrain"):
        if is_validation(key, SHARED_VAL_FRACTION):
            ids = tok.encode(rec["text"])
            if len(ids) >= length:
                prompts.append([tok.bos_id] + ids[: length - 1])
        if len(prompts) >= n:
            return prompts
    raise SystemExit(f"only {len(prompts)} held-out en-gutenberg records have {length} tokens")


def measure_speed(models: dict, vers: list[Version], prompts: list[list[int]], gen: int, batches: list[int],
                  repeats: int) -> list[dict]:
    rows = []
    for B in batches:
        batch = prompts[:B]
        setts = {v.label: settings_for(v, gen, models[v.stage]) for v in vers}
        for v in vers:  # warm-up
            models[v.stage].interface.decode(batch, setts[v.label], stop=False)
        times = {v.label: [] for v in vers}
        info = {}
        for _ in range(repeats):
            for v in vers:
                out = models[v.stage].interface.decode(batch, setts[v.label], stop=False)
                times[v.label].append(out.seconds)
                tokens = sum(min(len(r), gen) for r in out.generated)
                info[v.label] = (out.forwards, tokens)
        for v in vers:
            fwd, tokens = info[v.label]
            sec = statistics.median(times[v.label])
            rows.append({"version": v.label, "batch": B, "tokens": tokens, "forwards": fwd,
                         "tpf": tokens / B / fwd, "seconds": sec, "tokens_per_s": tokens / sec})
            print(f"[versions] speed {v.label} batch {B}: {rows[-1]['tokens_per_s']:.1f} tok/s, "
                  f"TPF {rows[-1]['tpf']:.2f}", file=sys.stderr)
    return rows


def measure_quality(models: dict, vers: list[Version], prompts: list[str], max_new_tokens: int, judge) -> list[dict]:
    from nanollada.evaluation.generation import score_run
    from nanollada.generate import generate_text
    from nanollada.paradigms.base import ScoringSettings
    rows = []
    for v in vers:
        loaded = models[v.stage]
        s = settings_for(v, max_new_tokens, loaded)
        records = [generate_text(loaded, p, s) for p in prompts]
        row = {"version": v.label, "stage": v.stage, "settings": asdict(s),
               **score_run(loaded, records, judge, ScoringSettings(batch_size=8)),
               # the first prompt of each half (the default prompts: English, then Chinese)
               "samples": [{"prompt": r["prompt"], "completion": r["completion"]}
                           for r in (records[0], records[len(records) // 2])]}
        rows.append(row)
        print(f"[versions] quality {v.label}: judge ppl {row.get('judge_ppl')}, rep4 {row['rep4']:.3f}, "
              f"{row['mean_tokens']:.1f} tokens, {row['empty']} empty, TPF {row['tpf']:.2f}", file=sys.stderr)
    return rows


def markdown(result: dict) -> str:
    q = {r["version"]: r for r in result["quality"]}
    speed = {(r["version"], r["batch"]): r for r in result["speed"]}
    batches = sorted({r["batch"] for r in result["speed"]})
    head = ["version", "checkpoint", "judge ppl", "rep-4gram", "unigram entropy", "mean tokens", "empty",
            "TPF (answers)"] + [f"tok/s b{b}" for b in batches] + [f"TPF b{b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in q.items():
        jp = r.get("judge_ppl")
        cells = [label, r["stage"], "-" if jp is None else f"{jp:.1f}", f"{r['rep4']:.3f}",
                 f"{r['unigram_entropy']:.2f}", f"{r['mean_tokens']:.1f}", f"{r['empty']}/{r['prompts']}",
                 f"{r['tpf']:.2f}"]
        cells += [f"{speed[(label, b)]['tokens_per_s']:.1f}" for b in batches]
        cells += [f"{speed[(label, b)]['tpf']:.2f}" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Samples (verbatim, cut at 160 characters):", ""]
    for label, r in q.items():
        for smp in r["samples"]:
            text = smp["completion"].replace("\n", "\\n").replace("|", "\\|")
            text = text[:160] + ("..." if len(text) > 160 else "")
            prompt = smp["prompt"][:60].replace("\n", " ").replace("|", "\\|")
            lines.append(f"- {label} -- *{prompt}* -> {text or '(empty)'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="logs/real_cpu", help="pipeline run directory with the stage checkpoints")
    ap.add_argument("--out", default=None, help="output directory (default <run>/version_study)")
    ap.add_argument("--data_root", default="../shared/data", help="data root (held-out prompts)")
    ap.add_argument("--prompts", nargs="+", default=["sft-alpaca-en", "sft-alpaca-zh"],
                    help="prompt specs of nanollada eval --generate (sft-<name>: held-out conversations)")
    ap.add_argument("--limit", type=int, default=8, help="prompts per spec")
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--threshold", type=float, default=0.9, help="2.0's commit threshold")
    ap.add_argument("--gen", type=int, default=64, help="tokens per row in the speed runs")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    import torch

    from nanollada.evaluation.generation import load_prompts
    from nanollada.loading import load_checkpoint
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    out = Path(args.out or run / "version_study")
    vers = versions(args.threshold)
    models = {}
    for v in vers:
        path = run / v.stage / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise SystemExit(f"{path} not found: run the pipeline (its {v.stage} stage) first")
        models.setdefault(v.stage, load_checkpoint(str(path)))
    prompts = []
    for spec in args.prompts:
        got, where = load_prompts(spec, args.limit, root=args.data_root)
        print(f"[versions] prompts: {where}", file=sys.stderr)
        prompts += got
    start = time.time()
    quality = measure_quality(models, vers, prompts, args.max_new_tokens, models["ar_sft"])
    tok = models["ar_sft"].tokenizer
    speed = measure_speed(models, vers, speed_prompts(tok, Path(args.data_root), args.prompt_len,
                                                      max(args.batch_sizes)),
                          args.gen, args.batch_sizes, args.repeats)
    result = {"run": str(run), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "gen": args.gen,
              "prompt_len": args.prompt_len, "threads": torch.get_num_threads(),
              "seconds": round(time.time() - start, 1), "versions": [asdict(v) for v in vers],
              "quality": quality, "speed": speed}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    (out / "results.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
