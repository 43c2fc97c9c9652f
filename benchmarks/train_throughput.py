#!/usr/bin/env python
"""Training throughput: the real Lightning path vs a bare PyTorch loop over the same model, optimizer and batches.

For every preset x paradigm (``--paradigms``, default every paradigm of ``nanollada.lm.LM_CLASSES``: AR, masked
diffusion, block diffusion, and any class registered later) the script builds the paradigm's LightningModule and
one DataLoader of random tokens that yields exactly the batch dicts its own pretraining collate produces
(``lm.collate_cls`` on packed pretraining rows: ``{"tokens", "doc_ids"}`` items of seq_len + 1 tokens). Then,
alternating for ``--rounds`` rounds:

- Lightning: a fresh ``Trainer`` (max_steps = warmup + steps, logger off, checkpointing off, progress bar off,
  validation off, the configs' gradient clipping) fits the module; a callback times the steps after the warmup
  (data fetch, hooks, logging, optimizer and scheduler included);
- bare: the same backbone, a fresh AdamW with the module's own parameter groups and LR schedule, the same batches
  from the same DataLoader in the same order, the module's own ``training_loss`` (so the same loss and the same
  seeded noise as the Lightning path, with a stand-in for the few trainer fields it reads and ``self.log`` a
  no-op), clipping and optimizer step, and nothing else.

Both time with ``time.perf_counter`` (after ``torch.cuda.synchronize`` on CUDA). Reported: median tokens/s over the
rounds (data tokens: batch x seq_len per step), the Lightning overhead ``bare tok/s / lightning tok/s - 1``, and
achieved GFLOP/s: the module's own ``flops_per_batch`` count per data token (``Transformer.flops_per_token``, 6N +
attention; block diffusion feeds x_t and x_0, 2L positions, and counts them) x tok/s / 1e9.

    python benchmarks/train_throughput.py --presets tiny small --steps 10 --batch-size 8 --seq-len 128
    python benchmarks/train_throughput.py --presets base --device cuda --precision bf16-mixed --batch-size 32 --seq-len 512
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import logging
import statistics
import sys
import time
import warnings
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, Dataset


def paradigms() -> tuple[str, ...]:
    """Every paradigm with a training class (the keys of ``nanollada.lm.LM_CLASSES``)."""
    from nanollada.lm import LM_CLASSES
    return tuple(LM_CLASSES)


class RandomPackedRows(Dataset):
    """Packed-pretraining-shaped items of random tokens: ``{"tokens": (L+1,), "doc_ids": (L+1,)}``.

    doc_len > 0 starts a new document with probability 1/doc_len at each position (ids 0, 1, ... from the row
    start, as ``PackedRows`` numbers them); 0 keeps one document per row. Effectively infinite (rows cycle)."""

    def __init__(self, n_rows: int, seq_len: int, vocab_size: int, doc_len: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(7, vocab_size, (n_rows, seq_len + 1), generator=g)  # ids >= 7: no specials
        if doc_len > 0:
            starts = torch.rand(n_rows, seq_len + 1, generator=g) < 1.0 / doc_len
            starts[:, 0] = False
            self.doc_ids = starts.long().cumsum(1)
        else:
            self.doc_ids = torch.zeros(n_rows, seq_len + 1, dtype=torch.long)

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i %= len(self.tokens)
        return {"tokens": self.tokens[i], "doc_ids": self.doc_ids[i]}


def make_sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def lightning_run(lm, loader, args, device) -> float:
    """Seconds for ``args.steps`` training steps after ``args.warmup`` ones, through ``Trainer.fit``."""
    import lightning as L

    sync = make_sync(device)

    class StepTimer(L.Callback):
        def __init__(self):
            self.n, self.t0, self.t1 = 0, None, None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.n += 1
            if self.n == args.warmup:
                sync()
                self.t0 = time.perf_counter()
            elif self.n == args.warmup + args.steps:
                sync()
                self.t1 = time.perf_counter()

    timer = StepTimer()
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        max_steps=args.warmup + args.steps, precision=args.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=args.grad_clip or None,
                        log_every_n_steps=args.log_every, callbacks=[timer])
    with contextlib.redirect_stdout(io.StringIO()):  # the module's parameter-count banner, every round
        trainer.fit(lm, train_dataloaders=loader)
    if timer.t1 is None:
        raise RuntimeError(f"Lightning ran {timer.n} steps, expected {args.warmup + args.steps}")
    return timer.t1 - timer.t0


def bare_run(lm, loader, args, device) -> float:
    """The same steps in plain PyTorch: forward, loss, backward, clip, AdamW, LR schedule."""
    from nanollada.lm.base import lr_factor

    lm = lm.to(device).train()
    model, h = lm.model, lm.hparams
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": h.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=h.lr, betas=tuple(h.betas),
                            fused=device.type == "cuda")
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, h.warmup_steps, total, h.schedule, h.min_lr_ratio, h.decay_fraction))
    params = list(model.parameters())
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                else contextlib.nullcontext())
    sync = make_sync(device)
    it = iter(loader)
    t0 = None
    with without_trainer(lm) as stand_in:
        for step in range(total):
            if step == args.warmup:
                sync()
                t0 = time.perf_counter()
            batch = next(it)
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            stand_in.global_step = step
            with autocast:
                loss = lm.training_loss(batch, step)  # the module's own loss, masks and noise
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            sched.step()
        sync()
    return time.perf_counter() - t0


@contextlib.contextmanager
def without_trainer(lm):
    """Let ``lm.training_loss`` run outside a ``Trainer``: the trainer fields a loss reads (``global_step``,
    ``global_rank``, ``accumulate_grad_batches``, ``world_size``) come from a stand-in of one process without
    accumulation, and ``self.log`` does nothing. The module's own trainer reference is restored after."""
    stand_in = SimpleNamespace(global_step=0, global_rank=0, local_rank=0, world_size=1, accumulate_grad_batches=1,
                               log_every_n_steps=1, datamodule=None, ckpt_path=None)
    before = lm._trainer
    lm.trainer = stand_in
    lm.log = lambda *args, **kwargs: None
    try:
        yield stand_in
    finally:
        del lm.log
        lm.trainer = before


def build(preset: str, paradigm: str, args):
    from nanollada.lm import LM_CLASSES
    torch.manual_seed(args.seed)
    kw = dict(preset=preset, max_seq_len=max(args.seq_len, 64), lr=args.lr, warmup_steps=args.warmup,
              schedule="cosine", compile=args.compile)
    cls = LM_CLASSES[paradigm]
    if "random_length_prob" in inspect.signature(cls.__init__).parameters:
        kw["random_length_prob"] = 0.0  # full-length rows in both paths
    return cls(**kw)


def make_loader(lm, batch_size: int, seq_len: int, device, doc_len: int = 0, seed: int = 0) -> DataLoader:
    """Random packed rows through the module's own pretraining collate (``lm.collate_cls``), 8 distinct batches."""
    tok = lm.tokenizer
    data = RandomPackedRows(batch_size * 8, seq_len, tok.vocab_size, doc_len, seed)
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0,
                      collate_fn=lm.collate_cls("pretrain", tok.pad_id, tok.eos_id, max_len=seq_len),
                      pin_memory=device.type == "cuda")


def bench(preset: str, paradigm: str, args, device) -> dict:
    lm = build(preset, paradigm, args)
    loader = make_loader(lm, args.batch_size, args.seq_len, device, args.doc_len, args.seed)
    tokens = args.steps * args.batch_size * args.seq_len
    light, bare = [], []
    for r in range(args.rounds):
        light.append(tokens / lightning_run(lm, loader, args, device))
        bare.append(tokens / bare_run(lm, loader, args, device))
        print(f"  {preset}/{paradigm} round {r + 1}: lightning {light[-1]:,.0f} tok/s, bare {bare[-1]:,.0f} tok/s",
              file=sys.stderr, flush=True)
    lt, bt = statistics.median(light), statistics.median(bare)
    fpt = lm.flops_per_batch / (args.batch_size * args.seq_len)  # the module's count (Lightning path, last batch)
    return dict(preset=preset, paradigm=paradigm, lm_class=type(lm).__name__, params=lm.model.num_params(),
                batch=args.batch_size, seq_len=args.seq_len, flops_per_token=fpt, lightning_tok_s=lt, bare_tok_s=bt,
                overhead_pct=100 * (bt / lt - 1),
                lightning_gflops=fpt * lt / 1e9, bare_gflops=fpt * bt / 1e9, rounds_lightning=light,
                rounds_bare=bare)


def table(rows: list[dict]) -> str:
    out = ["| preset | paradigm | params | batch x seq | lightning tok/s | bare tok/s | overhead % | "
           "GFLOP/s (lightning) | GFLOP/s (bare) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['preset']} | {r['paradigm']} | {r['params'] / 1e6:.2f}M | {r['batch']} x {r['seq_len']} | "
                   f"{r['lightning_tok_s']:,.0f} | {r['bare_tok_s']:,.0f} | {r['overhead_pct']:+.1f} | "
                   f"{r['lightning_gflops']:.2f} | {r['bare_gflops']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small", "base"], choices=["tiny", "small", "base"])
    p.add_argument("--paradigms", nargs="+", default=list(paradigms()), choices=paradigms(),
                   help="paradigms of nanollada.lm.LM_CLASSES")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round and path")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (>= 1)")
    p.add_argument("--rounds", type=int, default=2, help="lightning/bare alternations; the median is reported")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 = off (the configs use 1.0)")
    p.add_argument("--log-every", type=int, default=50, help="Trainer log_every_n_steps (finite-loss check period)")
    p.add_argument("--doc-len", type=int, default=0,
                   help="mean document length in the packed rows (document attention masks); 0 = one per row")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (both paths)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows (with per-round numbers) to this file")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(f"device {device} ({torch.get_num_threads()} threads), precision {args.precision}, {args.warmup} warmup + "
          f"{args.steps} timed steps x {args.rounds} rounds, batch {args.batch_size} x {args.seq_len}",
          file=sys.stderr)
    rows = [bench(pr, pa, args, device) for pr in args.presets for pa in args.paradigms]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "device": str(device), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
