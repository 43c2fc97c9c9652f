#!/usr/bin/env python
"""Decoding speed of both paradigms on one backbone: AR (with / without KV cache) and every diffusion strategy.

Methods (greedy, no eos stop, so every run generates exactly gen_length tokens per row):

- ``ar kv-cache`` / ``ar no-cache``: ``ar_generate`` with incremental decoding, or recomputing the whole sequence;
- ``lowconf 1-block``: LLaDA low-confidence remasking over one block of gen_length, ``steps x gen/block`` forwards;
- ``lowconf semi-AR``: blocks of ``--block-length``, ``--steps`` forwards each, the model sees the whole canvas
  (LLaDA); ``... no-future`` runs it only up to the current block's end; ``... +prefix-cache`` uses the Fast-dLLM
  prefix KV cache (block start: one forward over [0, block_end); then only the block is fed);
- ``threshold semi-AR`` (Fast-dLLM confidence threshold) and ``threshold_topk semi-AR`` (v0.1.0: threshold + at most
  ``--commit-top-k`` per step + optional ``--budget``), each without and with the prefix cache.

Columns: forwards per generated token (per row: a forward serves the whole batch), token positions fed to the
model per generated token (a FLOPs proxy), latency to the first token (AR: prefill + first sample) or to the end of
the first denoising round (diffusion), total seconds (median of ``--repeats``) and generated tokens/s (batch x gen /
seconds). A second table gives the measured prefix-cache speed-up per strategy.

With a random-init model (``--preset``) every confidence is ~1/vocab, so the threshold strategies commit one token
per forward (their worst case); use ``--ckpt`` with trained AR and diffusion checkpoints for realistic numbers.

    python benchmarks/decode_speed.py --preset tiny --batch-sizes 1 8 --gen-lengths 64 256
    python benchmarks/decode_speed.py --ckpt logs/tiny_ar_sft/checkpoints/last.ckpt \\
        logs/tiny_diffusion_sft/checkpoints/last.ckpt --batch-sizes 1 --gen-lengths 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Method:
    name: str
    paradigm: str
    run: Callable  # (model, prompt (B, P), gen_length) -> dict


def _ar(use_kv_cache: bool):
    def run(model, prompt, G, mask_id=None):
        from nanollada.sampling.ar import ar_generate
        B, P = prompt.shape
        out = ar_generate(model, prompt, max_new_tokens=G, temperature=0.0, eos_id=None, use_kv_cache=use_kv_cache)
        n = sum(len(g) for g in out.generated)
        assert n == B * G, (n, B * G)
        fed = B * (P + G - 1) if use_kv_cache else B * sum(P + i for i in range(out.forwards))
        return dict(seconds=out.seconds, first=out.first_token_seconds, forwards=out.forwards, fed=fed, tokens=n)
    return run


def _diffusion(strategy_fn, block_length=None, use_prefix_cache=False, attend_future_blocks=None):
    def run(model, prompt, G, mask_id):
        from nanollada.sampling.diffusion import diffusion_generate
        L = block_length(G) if callable(block_length) else block_length
        out = diffusion_generate(model, prompt, gen_length=G, block_length=L, strategy=strategy_fn(G, L),
                                 mask_id=mask_id, eos_id=None, temperature=0.0, use_prefix_cache=use_prefix_cache,
                                 attend_future_blocks=attend_future_blocks)
        n = out.generated.numel()
        return dict(seconds=out.seconds, first=out.first_round_seconds, forwards=out.forwards,
                    fed=out.forward_tokens, tokens=n)
    return run


def methods(args) -> list[Method]:
    from nanollada.sampling.diffusion import ConfidenceThreshold, LowConfidence, ThresholdTopKBudget
    bl, steps = args.block_length, args.steps or args.block_length
    semi = lambda G: min(bl, G)  # noqa: E731
    lowconf = lambda G, L: LowConfidence(max(1, steps * L // bl))  # same tokens per forward in every layout
    thr = lambda G, L: ConfidenceThreshold(args.threshold)  # noqa: E731
    topk = lambda G, L: ThresholdTopKBudget(args.threshold, args.commit_top_k, args.budget)  # noqa: E731
    ms = [Method("ar kv-cache", "ar", _ar(True)), Method("ar no-cache", "ar", _ar(False)),
          Method("lowconf 1-block", "diffusion", _diffusion(lowconf, lambda G: G)),
          Method("lowconf semi-AR", "diffusion", _diffusion(lowconf, semi)),
          Method("lowconf semi-AR no-future", "diffusion", _diffusion(lowconf, semi, attend_future_blocks=False)),
          Method("lowconf semi-AR +prefix-cache", "diffusion", _diffusion(lowconf, semi, use_prefix_cache=True)),
          Method("threshold semi-AR", "diffusion", _diffusion(thr, semi)),
          Method("threshold semi-AR +prefix-cache", "diffusion", _diffusion(thr, semi, use_prefix_cache=True)),
          Method("threshold_topk semi-AR", "diffusion", _diffusion(topk, semi)),
          Method("threshold_topk semi-AR +prefix-cache", "diffusion", _diffusion(topk, semi, use_prefix_cache=True))]
    if args.only:
        ms = [m for m in ms if any(s in m.name for s in args.only)]
    return ms


def load_models(args, device) -> tuple[dict, object, str]:
    """{paradigm: Transformer} and the tokenizer, from checkpoints / exports or a random-init preset."""
    from nanollada.model import ModelConfig, Transformer
    from nanollada.tokenizer import Tokenizer
    models, tok = {}, None
    if args.ckpt:
        for path in args.ckpt:
            if Path(path).is_dir():
                from nanollada.export import load_exported
                loaded = load_exported(path, device)
            else:
                from nanollada.lm.base import load_checkpoint
                loaded = load_checkpoint(path, device)
            if loaded.paradigm in models:
                raise SystemExit(f"two {loaded.paradigm} checkpoints given")
            models[loaded.paradigm], tok = loaded.model, loaded.tokenizer
        source = ", ".join(args.ckpt)
    else:
        tok = Tokenizer(args.tokenizer)
        need = args.prompt_len + max(args.gen_lengths)
        cfg = ModelConfig.from_preset(args.preset, vocab_size=tok.vocab_size, max_seq_len=max(need, 64), causal=True)
        torch.manual_seed(args.seed)
        ar = Transformer(cfg)
        diff = Transformer(ModelConfig.from_dict({**cfg.to_dict(), "causal": False}))
        diff.load_state_dict(ar.state_dict())  # the same weights, only the attention pattern differs
        models = {"ar": ar.to(device).eval(), "diffusion": diff.to(device).eval()}
        source = f"random-init {args.preset} preset"
    for m in models.values():
        if args.prompt_len + max(args.gen_lengths) > m.cfg.max_seq_len:
            raise SystemExit(f"prompt {args.prompt_len} + gen {max(args.gen_lengths)} > max_seq_len {m.cfg.max_seq_len}")
    return models, tok, source


def measure(method: Method, model, prompt, G, mask_id, repeats: int) -> dict:
    runs = [method.run(model, prompt, G, mask_id) for _ in range(repeats)]
    best = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "first")}
    r = runs[0]
    B = prompt.shape[0]
    return dict(method=method.name, paradigm=method.paradigm, batch=B, gen=G, forwards=r["forwards"],
                forwards_per_token=r["forwards"] / G, fed_per_token=r["fed"] / r["tokens"],
                first_ms=1e3 * best["first"], seconds=best["seconds"], tok_s=r["tokens"] / best["seconds"])


def table(rows) -> str:
    out = ["| method | batch | gen | forwards | forwards / token | fed tokens / gen token | first token/round ms | "
           "total s | tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['batch']} | {r['gen']} | {r['forwards']} | {r['forwards_per_token']:.3f} | "
                   f"{r['fed_per_token']:.1f} | {r['first_ms']:.1f} | {r['seconds']:.3f} | {r['tok_s']:,.0f} |")
    return "\n".join(out)


def cache_table(rows) -> str:
    by = {(r["method"], r["batch"], r["gen"]): r for r in rows}
    out = ["| strategy | batch | gen | tok/s no cache | tok/s prefix cache | speed-up | speed-up vs no-future |",
           "|---|---|---|---|---|---|---|"]
    for (name, B, G), r in by.items():
        if not name.endswith(" +prefix-cache"):
            continue
        base = by.get((name.replace(" +prefix-cache", ""), B, G))
        trunc = by.get((name.replace(" +prefix-cache", " no-future"), B, G))
        if base is None:
            continue
        vs_trunc = f"{r['tok_s'] / trunc['tok_s']:.2f}x" if trunc else "-"
        out.append(f"| {name.replace(' +prefix-cache', '')} | {B} | {G} | {base['tok_s']:,.0f} | {r['tok_s']:,.0f} | "
                   f"{r['tok_s'] / base['tok_s']:.2f}x | {vs_trunc} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"], help="random-init model size")
    p.add_argument("--ckpt", nargs="+", default=None,
                   help="AR and/or diffusion checkpoints (.ckpt) or exported directories, instead of --preset")
    p.add_argument("--tokenizer", default=None, help="random init: tokenizer (default: the shipped one)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--gen-lengths", nargs="+", type=int, default=[64, 256])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--block-length", type=int, default=32, help="semi-AR block length")
    p.add_argument("--steps", type=int, default=None,
                   help="low-confidence forwards per block of --block-length (default: the block length, LLaDA's "
                        "one token per forward); scaled for the one-block layout")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--commit-top-k", type=int, default=4)
    p.add_argument("--budget", type=int, default=None, help="threshold_topk decode budget (forwards per generation)")
    p.add_argument("--only", nargs="+", default=None, help="run only methods whose name contains one of these")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell (median)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    for G in args.gen_lengths:
        if G % min(args.block_length, G):
            p.error(f"gen length {G} is not a multiple of --block-length {args.block_length}")
    models, tok, source = load_models(args, device)
    ms = [m for m in methods(args) if m.paradigm in models]
    g = torch.Generator().manual_seed(args.seed)
    print(f"{source}; device {device} ({torch.get_num_threads()} threads); prompt {args.prompt_len} tokens; "
          f"block {args.block_length}, steps/block {args.steps or args.block_length}, threshold {args.threshold}",
          file=sys.stderr)
    # warm-up: every method once, smallest shapes (allocator, kernels, lazy init)
    warm = torch.randint(7, tok.vocab_size, (1, args.prompt_len), generator=g).to(device)
    for m in ms:
        measure(m, models[m.paradigm], warm, min(args.block_length, min(args.gen_lengths)), tok.mask_id, 1)
    rows = []
    for B in args.batch_sizes:
        prompt = torch.randint(7, tok.vocab_size, (B, args.prompt_len), generator=g).to(device)
        for G in args.gen_lengths:
            for m in ms:
                t0 = time.perf_counter()
                rows.append(measure(m, models[m.paradigm], prompt, G, tok.mask_id, args.repeats))
                print(f"  {m.name} B={B} G={G}: {rows[-1]['tok_s']:,.0f} tok/s ({time.perf_counter() - t0:.1f}s)",
                      file=sys.stderr, flush=True)
    print(table(rows))
    cache = cache_table(rows)
    if cache.count("\n") > 1:
        print("\nPrefix-cache speed-up (tok/s with cache / without):\n")
        print(cache)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "source": source, "device": str(device), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
