#!/usr/bin/env python
"""What masked diffusion's prefix cache changes, separated from what dropping the later blocks changes.

For a trained masked-diffusion checkpoint and validation prompts, decode greedily (no eos stop, blocks of
``--block-length``) three ways and count the generated tokens that differ from LLaDA's full-canvas decoding:

- ``full canvas``: the model sees the prompt and every block, later ones still masked (LLaDA ``generate.py``);
- ``up to the current block``: the later masked blocks are dropped from the input (``attend_future_blocks=False``);
- ``+ prefix cache``: that, plus Fast-dLLM's prefix cache (prompt and finished blocks computed once per block start,
  only the current block refined; their deeper keys are frozen at the block-start state).

The second row isolates the effect of dropping the future blocks, the third adds the cache's own approximation.
Columns: share of tokens that differ from full-canvas decoding (over all prompts) and tokens/s (median of
``--repeats``, the three alternated). Block diffusion needs no such table: its cache is exact by construction
(``tests/test_block_diffusion.py``).

    python benchmarks/cache_agreement.py --ckpt logs/study/masked_diffusion/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    from nanollada.generate import GenerationSettings
    from nanollada.sampling.diffusion import STRATEGIES, build_strategy, diffusion_generate
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", default="../shared/data/pretrain/en-gutenberg.jsonl.gz",
                    help="pretraining file whose validation records give the prompts")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--strategy", choices=list(STRATEGIES), default="low_confidence",
                    help="a registered sampling strategy (nanollada.sampling.diffusion.STRATEGIES)")
    ap.add_argument("--steps", type=int, default=None,
                    help="fixed-step strategies: steps per block (default: the block length, one token per step)")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--commit-top-k", type=int, default=4, help="threshold_topk: at most this many per step")
    ap.add_argument("--budget", type=int, default=None, help="threshold_topk: forwards per generation")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nanollada.data.records import SHARED_VAL_FRACTION, is_validation, iter_records
    from nanollada.loading import load_checkpoint
    lm = load_checkpoint(args.ckpt)
    tok = lm.tokenizer
    prompts = []
    path = args.data if Path(args.data).is_absolute() else str(REPO / args.data)
    for key, rec in iter_records(path, "pretrain"):
        if is_validation(key, SHARED_VAL_FRACTION):
            ids = tok.encode(rec["text"])
            if len(ids) >= args.prompt_len:
                prompts.append([tok.bos_id] + ids[: args.prompt_len - 1])
        if len(prompts) >= args.prompts:
            break
    x = torch.tensor(prompts)
    L = args.block_length
    settings = GenerationSettings(max_new_tokens=args.gen, strategy=args.strategy, steps=args.steps, block_length=L,
                                  threshold=args.threshold, commit_top_k=args.commit_top_k, budget=args.budget)
    strategy = build_strategy(args.strategy, settings, L)  # the registry's, as every decoder builds it
    modes = {"full canvas (LLaDA)": dict(attend_future_blocks=True),
             "up to the current block": dict(attend_future_blocks=False),
             "up to the current block + prefix cache": dict(use_prefix_cache=True)}
    outs, secs = {}, {m: [] for m in modes}
    for _ in range(args.repeats):
        for m, kw in modes.items():
            out = diffusion_generate(lm.model, x, gen_length=args.gen, block_length=L, strategy=strategy,
                                     mask_id=tok.mask_id, temperature=0.0, **kw)
            outs[m], _ = out, secs[m].append(out.seconds)
    ref = outs["full canvas (LLaDA)"].generated
    rows = []
    for m in modes:
        g = outs[m].generated
        rows.append(dict(mode=m, differ=float((g != ref).float().mean()), forwards=outs[m].forwards,
                         tok_s=g.numel() / statistics.median(secs[m])))
    print(f"| decoding ({args.strategy}, blocks of {L}, {len(prompts)} prompts x {args.gen} tokens) | tokens that "
          "differ from full canvas | forwards | tokens/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['differ']:.1%} | {r['forwards']} | {r['tok_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"[cache_agreement] {args.ckpt}", file=sys.stderr)


if __name__ == "__main__":
    main()
