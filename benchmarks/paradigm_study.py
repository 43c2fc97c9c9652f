#!/usr/bin/env python
"""AR vs masked diffusion vs block diffusion (several block sizes) on one backbone, matched steps and tokens.

One AR pretraining run on the real zh+en mix (``configs/real/cpu/ar_pretrain.yaml``, ``small`` preset), then from
that checkpoint, with the same steps, batch and rows each: AR itself (``ar_continued``, the matched baseline), masked
diffusion (``diffusion_from_ar``) and block diffusion at every ``--block-sizes`` (``block_diffusion_from_ar`` with a fixed block size, no schedule). Then:

- ``nanollada eval`` held-out perplexity per source on identical validation tokens (AR exact, the diffusion models
  their Monte-Carlo ELBO bounds);
- decoding speed at batch 1 and 8 on the same validation prompts (``--prompt-len`` tokens), greedy, no eos stop
  (every run produces exactly ``--gen`` tokens per row): AR with KV cache, masked diffusion with threshold + prefix
  cache (blocks of 32), block diffusion with threshold and the exact block cache; tokens per forward (TPF, every
  forward counted) and generated tokens/s (median of ``--repeats``, runs alternated).

Everything goes under ``--out`` (default ``logs/study``); ``results.json`` and ``results.md`` at the end. Each fit
is skipped when its ``last.ckpt`` exists (rerun-safe).

    python benchmarks/paradigm_study.py --ar-steps 400 --steps 200 --batch-size 8 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["en-gutenberg", "en-shakespeare", "zh-modern", "zh-novels", "zh-poetry"]


def fit(name: str, config: str, args, extra: list[str], steps: int) -> Path:
    ckpt_dir = Path(args.out) / name / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if last.exists():
        print(f"[study] {name}: {last} exists, skipped", file=sys.stderr)
        return last
    cmd = [sys.executable, "-m", "nanollada", "fit", "--config", str(REPO / config),
           "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
           "--trainer.limit_val_batches", str(args.val_batches), "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(args.out), "--trainer.logger.init_args.name", name,
           "--trainer.logger.init_args.version", "0",
           "--data.batch_size", str(args.batch_size), "--data.seq_len", str(args.seq_len),
           "--model.warmup_steps", str(max(1, steps // 20)), *extra]
    # the callbacks list is replaced whole by a dotted override, so the checkpoint dir goes in by a small config
    cb = Path(args.out) / f"{name}_callbacks.yaml"
    cb.parent.mkdir(parents=True, exist_ok=True)
    cb.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                  f"      init_args:\n        dirpath: {ckpt_dir}\n        save_last: true\n        save_top_k: 1\n"
                  f"        every_n_train_steps: {steps}\n"
                  "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
                  "    - class_path: nanollada.callbacks.TokenThroughputMonitor\n")
    cmd += ["--config", str(cb)]
    t0 = time.perf_counter()
    print(f"[study] {name}: {' '.join(cmd[3:])}", file=sys.stderr)
    r = subprocess.run(cmd, cwd=REPO)
    if r.returncode:
        raise SystemExit(f"[study] {name} failed (rc {r.returncode})")
    (Path(args.out) / name / "fit_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return last


def decode_speed(ckpts: dict[str, Path], args) -> list[dict]:
    from nanollada.data.records import SHARED_VAL_FRACTION, is_validation, iter_records
    from nanollada.loading import load_checkpoint
    from nanollada.sampling.ar import ar_generate
    from nanollada.sampling.block_diffusion import block_diffusion_generate, canvas_length
    from nanollada.sampling.diffusion import ConfidenceThreshold, diffusion_generate
    torch.set_num_threads(args.threads)
    loaded = {n: load_checkpoint(str(p)) for n, p in ckpts.items()}
    tok = next(iter(loaded.values())).tokenizer
    prompts = []
    for key, rec in iter_records(str(REPO / args.data_root / "pretrain" / "en-gutenberg.jsonl.gz"), "pretrain"):
        if is_validation(key, SHARED_VAL_FRACTION):
            ids = tok.encode(rec["text"])
            if len(ids) >= args.prompt_len:
                prompts.append([tok.bos_id] + ids[: args.prompt_len - 1])
        if len(prompts) >= 8:
            break

    def run(name, B):
        lm = loaded[name]
        x = torch.tensor(prompts[:B])
        thr = ConfidenceThreshold(args.threshold)
        if lm.model.cfg.causal:  # AR: KV cache
            out = ar_generate(lm.model, x, max_new_tokens=args.gen, temperature=0.0, eos_id=None)
            return out.seconds, out.forwards, B * args.gen
        bs = lm.paradigm_config.get("block_size")
        if bs:
            G = canvas_length(x.shape[1], args.gen, bs, lm.model.cfg.max_seq_len)
            out = block_diffusion_generate(lm.model, x, gen_length=G, block_size=bs, strategy=thr,
                                           mask_id=tok.mask_id, use_cache=True)
        else:
            out = diffusion_generate(lm.model, x, gen_length=args.gen, block_length=32, strategy=thr,
                                     mask_id=tok.mask_id, use_prefix_cache=True)
        return out.seconds, out.forwards, out.generated.numel()

    rows = []
    for B in args.batch_sizes:
        for name in loaded:  # warm-up
            run(name, B)
        times = {n: [] for n in loaded}
        info = {}
        for _ in range(args.repeats):  # alternate the runs, so load changes hit every method alike
            for name in loaded:
                sec, fwd, n = run(name, B)
                times[name].append(sec)
                info[name] = (fwd, n)
        for name in loaded:
            fwd, n = info[name]
            sec = statistics.median(times[name])
            rows.append(dict(model=name, batch=B, gen_tokens=n, forwards=fwd, tpf=n / B / fwd,
                             seconds=sec, tok_s=n / sec))
            print(f"[study] decode {name} batch {B}: {rows[-1]['tok_s']:.0f} tok/s, TPF {rows[-1]['tpf']:.2f}",
                  file=sys.stderr)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="logs/study")
    ap.add_argument("--ar-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=200, help="steps of every model trained from the AR checkpoint")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--eval-limit", type=int, default=16, help="validation records per source for perplexity")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = {"ar": fit("ar", "configs/real/cpu/ar_pretrain.yaml", args, [], args.ar_steps)}
    init = ["--model.init_from", str(ckpts["ar"])]
    # the AR baseline at matched steps: the same AR checkpoint trained --steps more on the same rows, like the others
    ckpts["ar_continued"] = fit("ar_continued", "configs/real/cpu/ar_pretrain.yaml", args, init, args.steps)
    ckpts["masked_diffusion"] = fit("masked_diffusion", "configs/real/cpu/diffusion_from_ar.yaml", args, init,
                                    args.steps)
    for b in args.block_sizes:
        ckpts[f"block_diffusion_b{b}"] = fit(f"block_diffusion_b{b}", "configs/real/cpu/block_diffusion_from_ar.yaml",
                                             args, init + ["--model.block_size", str(b),
                                                           "--model.block_schedule", "null"], args.steps)
    ev = out / "eval.json"
    if not ev.exists():
        cmd = [sys.executable, "-m", "nanollada", "eval", "--ckpt", *map(str, ckpts.values()), "--tasks",
               *[f"ppl-{s}" for s in SOURCES], "--limit", str(args.eval_limit), "--samples", str(args.samples),
               "--data_root", args.data_root, "--output", str(ev), "--markdown", str(out / "eval.md")]
        subprocess.run(cmd, cwd=REPO, check=True)
    speed = decode_speed(ckpts, args)
    result = {"args": vars(args), "checkpoints": {k: str(v) for k, v in ckpts.items()},
              "eval": json.loads(ev.read_text()), "decode": speed,
              "fit_seconds": {k: float((out / k / "fit_seconds.txt").read_text()) for k in ckpts
                              if (out / k / "fit_seconds.txt").exists()}}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = ["| model | batch | TPF | tokens/s |", "|---|---|---|---|"]
    md += [f"| {r['model']} | {r['batch']} | {r['tpf']:.2f} | {r['tok_s']:.0f} |" for r in speed]
    (out / "results.md").write_text((out / "eval.md").read_text() + "\n" + "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
