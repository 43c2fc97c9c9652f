#!/usr/bin/env python
"""Decoding speed of every registered paradigm on one backbone, each through its own ``Paradigm.decode``.

Methods are built from the registries, not from paradigm names: for every paradigm of ``nanollada.lm.LM_CLASSES``
(random init) or every ``--ckpt``, the cross product of

- the sampling strategies (``--strategies``, default three of ``nanollada.sampling.diffusion.STRATEGIES``),
- the block layouts (``--layouts``): ``semi-AR`` (blocks of ``--block-length``) and ``1-block`` (one block of the
  whole generation; LLaDA's single-block decoding),
- the cache: on (every cache the paradigm turns on by default: AR's KV cache, masked diffusion's Fast-dLLM prefix
  cache, block diffusion's exact cache of finished blocks, ``use_kv_cache``) or off (``use_kv_cache`` and
  ``use_prefix_cache`` false),

as ``GenerationSettings`` resolved with the paradigm's ``default_generation`` (greedy), decoded with
``Paradigm.decode(stop=False)`` (no eos stop: every row fills its canvas). Settings the paradigm decodes identically
(same ``Paradigm.decoding_key``) are one method, and a method's name lists only the axes that change this paradigm's
decoding: ``ar kv-cache`` / ``ar no-cache`` (AR reads neither strategy nor blocks), ``diffusion threshold semi-AR
prefix-cache``, ``block_diffusion low_confidence 1-block kv-cache``, ... A new paradigm appears without edits here.

Low-confidence decoding commits one token per forward (``--steps`` forwards per block of ``--block-length``, scaled
for the one-block layout). Block diffusion ends the canvas on a block boundary (prompt + generation), so with a
prompt that is not a multiple of the block it generates a few more tokens than asked: the ``gen`` column is what it
generated per row, and every per-token column uses it.

Columns: forwards per generated token (per row: a forward serves the whole batch), token positions fed to the
model per generated token (a FLOPs proxy, counted by a forward hook on the backbone), latency to the first token
(AR: prefill + first sample) or to the end of the first denoising round (diffusion), total seconds (median of
``--repeats``) and generated tokens/s (batch x generated / seconds). A second table gives the measured speed-up of
the cache per paradigm and strategy. (What dropping the later masked blocks changes, separately from the prefix
cache, is ``benchmarks/cache_agreement.py``'s question.)

With a random-init model (``--preset``) every confidence is ~1/vocab, so the threshold strategies commit one token
per forward (their worst case); use ``--ckpt`` with trained checkpoints for realistic numbers.

    python benchmarks/decode_speed.py --preset tiny --batch-sizes 1 8 --gen-lengths 64 256
    python benchmarks/decode_speed.py --ckpt logs/tiny_ar_sft/checkpoints/last.ckpt \\
        logs/tiny_diffusion_sft/checkpoints/last.ckpt --batch-sizes 1 --gen-lengths 128
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

LAYOUTS = ("semi-AR", "1-block")


@dataclass(frozen=True)
class Variant:
    """One point of the decoding grid; ``cache``: the paradigm's default caches on, or every cache off."""

    strategy: str
    layout: str
    cache: bool


@dataclass
class Method:
    name: str
    paradigm: str
    settings: Callable  # gen_length -> resolved GenerationSettings


def settings_for(interface, v: Variant, G: int, args):
    """The resolved ``GenerationSettings`` of variant ``v`` at ``G`` new tokens (greedy, the paradigm's defaults)."""
    from nanollada.generate import GenerationSettings
    block = G if v.layout == "1-block" else min(args.block_length, G)
    steps = None if args.steps is None else max(1, args.steps * block // args.block_length)
    s = GenerationSettings(max_new_tokens=G, greedy=True, strategy=v.strategy, block_length=block, steps=steps,
                           threshold=args.threshold, commit_top_k=args.commit_top_k, budget=args.budget,
                           seed=args.seed, use_kv_cache=v.cache, use_prefix_cache=None if v.cache else False)
    return s.resolve(interface.default_generation())


def cache_label(settings) -> str:
    if settings.use_prefix_cache:
        return "prefix-cache"
    return "kv-cache" if settings.use_kv_cache else "no-cache"


def methods(interfaces: dict, args) -> list[Method]:
    """Every distinct decoding of every paradigm over ``args.strategies x args.layouts x (cache on, off)``.

    Variants with the same ``decoding_key`` (at the longest generation) are one method; an axis is named in the
    method only when changing it changes this paradigm's key (probed over every registered strategy and layout)."""
    from nanollada.sampling.diffusion import STRATEGIES
    G = max(args.gen_lengths)
    axes = {"strategy": list(STRATEGIES), "layout": list(LAYOUTS), "cache": [True, False]}
    out = []
    for name, iface in interfaces.items():
        key = {v: iface.decoding_key(settings_for(iface, v, G, args))
               for v in itertools.starmap(Variant, itertools.product(*axes.values()))}
        matters = {axis: any(key[v] != key[replace(v, **{axis: x})] for v in key for x in values)
                   for axis, values in axes.items()}
        seen = set()
        for v in itertools.starmap(Variant, itertools.product(args.strategies, args.layouts, (True, False))):
            if key[v] in seen:
                continue
            seen.add(key[v])
            s = settings_for(iface, v, G, args)
            label = [name] + [v.strategy] * matters["strategy"] + [v.layout] * matters["layout"] + \
                [cache_label(s)] * matters["cache"]
            out.append(Method(" ".join(label), name, lambda G, iface=iface, v=v: settings_for(iface, v, G, args)))
    if args.only:
        out = [m for m in out if any(s in m.name for s in args.only)]
    return out


def random_interfaces(preset: str, tok, max_seq_len: int, device, dtype=None, seed: int = 0) -> dict:
    """{paradigm: its ``Paradigm``} for every paradigm of ``LM_CLASSES``: one random init of the ``preset`` shape
    shared by all (only the attention pattern, the class's ``causal``, differs), in eval mode."""
    from nanollada.lm import LM_CLASSES
    from nanollada.model import ModelConfig, Transformer
    from nanollada.paradigms import paradigm_class
    torch.manual_seed(seed)
    out, state = {}, None
    for name, cls in LM_CLASSES.items():
        m = Transformer(ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, max_seq_len=max_seq_len,
                                                causal=cls.causal))
        if state is None:
            state = m.state_dict()
        else:
            m.load_state_dict(state)
        out[name] = paradigm_class(name)(m.to(device=device, dtype=dtype).eval(), tok)
    return out


def load_interfaces(args, device) -> tuple[dict, object, str]:
    """{paradigm: Paradigm} and the tokenizer, from checkpoints / exports or a random-init preset."""
    from nanollada.tokenizer import Tokenizer
    interfaces, tok = {}, None
    if args.ckpt:
        for path in args.ckpt:
            if Path(path).is_dir():
                from nanollada.export import load_exported
                loaded = load_exported(path, device)
            else:
                from nanollada.loading import load_checkpoint
                loaded = load_checkpoint(path, device)
            if loaded.paradigm in interfaces:
                raise SystemExit(f"two {loaded.paradigm} checkpoints given")
            interfaces[loaded.paradigm], tok = loaded.interface, loaded.tokenizer
        source = ", ".join(args.ckpt)
    else:
        tok = Tokenizer(args.tokenizer)
        block = max(args.gen_lengths) if "1-block" in args.layouts else args.block_length
        need = args.prompt_len + max(args.gen_lengths) + block  # block diffusion ends on a block boundary
        interfaces = random_interfaces(args.preset, tok, max(need, 64), device, seed=args.seed)
        source = f"random-init {args.preset} preset"
    for iface in interfaces.values():
        if args.prompt_len + max(args.gen_lengths) > iface.model.cfg.max_seq_len:
            raise SystemExit(f"prompt {args.prompt_len} + gen {max(args.gen_lengths)} > max_seq_len "
                             f"{iface.model.cfg.max_seq_len}")
    return interfaces, tok, source


def measure(method: Method, interface, prompt: torch.Tensor, G: int, repeats: int) -> dict:
    """Decode ``prompt`` (B, P) ``repeats`` times with ``interface.decode(stop=False)``; a forward hook on the
    backbone counts the token positions fed (B x T of every call)."""
    s = method.settings(G)
    fed = [0]

    def count(module, inputs, logits):
        fed[0] += logits.shape[0] * logits.shape[1]

    hook = interface.model.register_forward_hook(count)
    runs = []
    try:
        for _ in range(repeats):
            fed[0] = 0
            out = interface.decode(prompt.tolist(), s, stop=False)
            first = getattr(out, "first_token_seconds", getattr(out, "first_round_seconds", float("nan")))
            runs.append(dict(seconds=out.seconds, first=first, forwards=out.forwards, fed=fed[0],
                             tokens=sum(len(row) for row in out.generated)))
    finally:
        hook.remove()
    best = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "first")}
    r = runs[0]
    B = prompt.shape[0]
    per_row = r["tokens"] / B
    return dict(method=method.name, paradigm=method.paradigm, batch=B, gen=G, generated=per_row,
                forwards=r["forwards"], forwards_per_token=r["forwards"] / per_row, tpf=per_row / r["forwards"],
                fed_per_token=r["fed"] / r["tokens"], first_ms=1e3 * best["first"], seconds=best["seconds"],
                tok_s=r["tokens"] / best["seconds"])


def _gen(r) -> str:
    return f"{r['generated']:g}"


def table(rows) -> str:
    out = ["| method | batch | gen | forwards | forwards / token | fed tokens / gen token | first token/round ms | "
           "total s | tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['batch']} | {_gen(r)} | {r['forwards']} | {r['forwards_per_token']:.3f} | "
                   f"{r['fed_per_token']:.1f} | {r['first_ms']:.1f} | {r['seconds']:.3f} | {r['tok_s']:,.0f} |")
    return "\n".join(out)


def cache_table(rows) -> str:
    """Per method with a cache: its tok/s over the same method's ``no-cache`` one (same batch and gen)."""
    by = {(r["method"], r["batch"], r["gen"]): r for r in rows}
    out = ["| method | batch | gen | tok/s no cache | tok/s cache | speed-up |", "|---|---|---|---|---|---|"]
    for (name, B, G), r in by.items():
        for label in ("prefix-cache", "kv-cache"):
            if name.endswith(" " + label):
                base = by.get((name[: -len(label)] + "no-cache", B, G))
                if base is not None:
                    out.append(f"| {name} | {B} | {G} | {base['tok_s']:,.0f} | {r['tok_s']:,.0f} | "
                               f"{r['tok_s'] / base['tok_s']:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> None:
    from nanollada.sampling.diffusion import STRATEGIES
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"], help="random-init model size")
    p.add_argument("--ckpt", nargs="+", default=None,
                   help="checkpoints (.ckpt) or exported directories, one per paradigm, instead of --preset")
    p.add_argument("--tokenizer", default=None, help="random init: tokenizer (default: the shipped one)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--gen-lengths", nargs="+", type=int, default=[64, 256])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--block-length", type=int, default=32, help="semi-AR block length")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                   help="diffusion sampling strategies (the registry's)")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS,
                   help="semi-AR blocks of --block-length, or one block of the whole generation")
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
    interfaces, tok, source = load_interfaces(args, device)
    ms = methods(interfaces, args)
    g = torch.Generator().manual_seed(args.seed)
    print(f"{source}; device {device} ({torch.get_num_threads()} threads); prompt {args.prompt_len} tokens; "
          f"block {args.block_length}, steps/block {args.steps or args.block_length}, threshold {args.threshold}; "
          f"{len(ms)} methods of {', '.join(interfaces)}", file=sys.stderr)
    # warm-up: every method once, smallest shapes (allocator, kernels, lazy init)
    warm = torch.randint(7, tok.vocab_size, (1, args.prompt_len), generator=g).to(device)
    for m in ms:
        measure(m, interfaces[m.paradigm], warm, min(args.block_length, min(args.gen_lengths)), 1)
    rows = []
    for B in args.batch_sizes:
        prompt = torch.randint(7, tok.vocab_size, (B, args.prompt_len), generator=g).to(device)
        for G in args.gen_lengths:
            for m in ms:
                t0 = time.perf_counter()
                rows.append(measure(m, interfaces[m.paradigm], prompt, G, args.repeats))
                print(f"  {m.name} B={B} G={G}: {rows[-1]['tok_s']:,.0f} tok/s ({time.perf_counter() - t0:.1f}s)",
                      file=sys.stderr, flush=True)
    print(table(rows))
    cache = cache_table(rows)
    if cache.count("\n") > 1:
        print("\nCache speed-up (tok/s with the paradigm's cache / without):\n")
        print(cache)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "source": source, "device": str(device), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
