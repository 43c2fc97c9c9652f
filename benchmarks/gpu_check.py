#!/usr/bin/env python
"""One prepared GPU check: flagship training speed and MFU, an FSDP fit + predict, and decoding speed, in a budget.

Written for short GPU slots (~15 minutes, one command of at most 10): nothing needs editing on the day.

    python benchmarks/gpu_check.py --device cuda                       # base preset, 8-minute budget
    python benchmarks/gpu_check.py --device cpu --preset tiny --budget 180   # the same code paths on CPU (its test)

Parts, in the order they run (``PARTS``), each with its own time cap (``--{part}_cap`` seconds; default a share of
the budget after startup: fsdp 20%, decode 30%, train 50% on CUDA, 40% / 25% / 35% on CPU, where the FSDP part's
two cold CLI starts are most of its cost; time a part leaves unused goes to the next one). The fixed-cost parts run
first so that what they leave unused goes to training, whose compilation is the most elastic; the tables are
printed in the order train, fsdp, decode (``SHOW``):

- ``fsdp``: ``nanollada fit`` of ``configs/multi_gpu/diffusion_pretrain_fsdp.yaml`` on every visible GPU
  (``torch.cuda.device_count()``; one is fine) for ``--fsdp_steps`` steps on the bundled ``data/pretrain.jsonl``,
  with a validation pass and a checkpoint, then ``nanollada predict --ckpt last.ckpt --prompt ...`` reloading it;
  both as subprocesses. Lightning runs FSDP only on CUDA, so on CPU the same derived config runs with its strategy
  replaced by a single-device one (and fp32), which the output says.
- ``decode``: decoding speed at batch 1 and 16 of every paradigm and strategy on a model of the preset's shape with
  random weights (``benchmarks/decode_speed.py``'s ``methods`` / ``measure``: each paradigm's ``Paradigm.decode``,
  methods built from the paradigm and strategy registries): AR with and without the KV cache, masked diffusion with
  every registered strategy (``sampling.diffusion.STRATEGIES``) without and with the prefix cache, block diffusion
  with every strategy without and with its exact cache, semi-AR blocks of ``--block_length``. Random weights give
  real forward costs but every confidence is ~1/vocab, so adaptive strategies commit ~1 token per forward (TPF ~1,
  their worst case).
- ``train``: training throughput of every paradigm in ``nanollada.lm.LM_CLASSES`` through the real Lightning path
  (``benchmarks/train_throughput.py``'s ``build`` / ``make_loader`` / ``lightning_run``: one ``Trainer.fit`` on
  random packed rows, logger/checkpoints/validation off), eager first for every paradigm, then ``torch.compile``
  (the module's ``compile: true``) with ``--compile_backend``: inductor on CUDA; on CPU ``aot_eager`` (dynamo
  capture and AOT autograd of forward and backward, the parts a GPU run shares with it, without inductor's C++ code
  generation, which takes minutes for three paradigms on two cores and is not the GPU's Triton path anyway).
  On CUDA: bf16-mixed, the batch ``--train_batch`` halved on out-of-memory until it fits, ``--train_steps`` timed
  steps after ``--train_warmup``. Reported: tokens/s (data tokens, B x L per step), training TFLOP/s from the
  module's own ``flops_per_batch`` (``Transformer.flops_per_token``; block diffusion feeds x_t + x_0, 2L positions,
  and counts them), MFU against the GPU's bf16 dense peak (``PEAK_BF16_TFLOPS`` by device name, ``--peak_tflops``
  overrides), ``torch.cuda.max_memory_allocated`` and the untimed setup seconds (trainer, warmup, compilation).

Parts ``train`` and ``decode`` run in a child process each (``--_part``) that streams its rows to a JSONL file; a
child that reaches its part's deadline is killed and every cell it had not finished is reported as cut (cells that
would not fit in the time left are cut before they start). Nothing is silently dropped: every planned cell ends as a
row, a ``cut`` or an ``error``. Output (``--out``): ``gpu_check.json`` (everything), ``train.json`` and
``decode.json`` (the CPU benchmarks' ``{"args", "device", "rows"}`` shape), ``gpu_check.md`` (the tables, printed at
the end), and one log per subprocess.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FSDP_CONFIG = REPO / "configs" / "multi_gpu" / "diffusion_pretrain_fsdp.yaml"
# Run order: the parts with a fixed cost first, training (compilation: the most elastic) last, so that the time the
# first two leave unused goes to it. Shares of the budget (after startup and the final reserve), per device type:
# on CPU the FSDP part's two cold CLI imports (fit, predict) are most of its cost.
PARTS = ("fsdp", "decode", "train")
SHARES = {"cuda": {"fsdp": 0.2, "decode": 0.3, "train": 0.5}, "cpu": {"fsdp": 0.4, "decode": 0.25, "train": 0.35}}
SHOW = ("train", "fsdp", "decode")  # order of the tables
RESERVE_S = 3.0  # kept back at the end for writing and printing the results

# bf16 dense tensor-core peak (no sparsity), TFLOP/s, by device name (case-insensitive regex, first match wins):
# NVIDIA data sheets (H100/H200 SXM 989, NVL 835, H100 PCIe 756; A100 312; L4 121; RTX 4090 165 with fp32
# accumulate, Ada whitepaper). "\bL4\b" so that an L40 / L40S does not match.
PEAK_BF16_TFLOPS = [(r"H200.*NVL", 835.0), (r"H200", 989.0), (r"H100.*NVL", 835.0), (r"H100.*PCIe", 756.0),
                    (r"H100", 989.0), (r"A100", 312.0), (r"\bL4\b", 121.0), (r"RTX 4090", 165.2)]

DEFAULTS = {  # per device type; every one is a flag
    "cuda": dict(precision="bf16-mixed", train_batch=64, train_seq_len=512, train_steps=40, train_warmup=5,
                 fsdp_steps=5, fsdp_batch=8, fsdp_seq_len=512, gen_length=256, prompt_len=32, block_length=32,
                 decode_dtype="bfloat16", compile_backend="inductor"),
    "cpu": dict(precision="32-true", train_batch=2, train_seq_len=32, train_steps=2, train_warmup=1,
                fsdp_steps=2, fsdp_batch=2, fsdp_seq_len=32, gen_length=8, prompt_len=8, block_length=4,
                decode_dtype="float32", threads=1, compile_backend="aot_eager"),
}


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The bf16 dense peak of a device by name (None when unknown, e.g. a CPU); ``override`` wins."""
    if override:
        return float(override)
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return tflops
    return None


# ====================================================================== child side: records
class Records:
    """Append-only JSONL of a part's progress: plan, start, row, cut, error and note records (``t``: seconds since
    the child process started)."""

    def __init__(self, path: str, t0: float):
        self.fh, self.t0 = open(path, "a", encoding="utf-8"), t0

    def write(self, type_: str, **kw) -> None:
        self.fh.write(json.dumps({"type": type_, "t": round(time.time() - self.t0, 2), **kw}, default=str) + "\n")
        self.fh.flush()


def _setup_child(a):
    import logging
    import warnings

    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(HERE))  # train_throughput, decode_speed
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch, device


def _run_cells(cells, rec, deadline: float, estimate, run) -> None:
    """Run cells in order; cut one before it starts when ``estimate(cell, done)`` seconds exceed the time left."""
    done: dict = {}
    for cell in cells:
        left = deadline - time.time()
        need = estimate(cell, done)
        if left <= 0 or need > left:
            rec.write("cut", cell=cell["id"], reason=f"not started: {max(left, 0):.0f} s left of the part's cap, "
                      f"~{need:.0f} s needed")
            continue
        t0 = time.time()
        rec.write("start", cell=cell["id"])
        try:
            row = run(cell)
        except Exception as e:  # noqa: BLE001  (one failing cell must not hide the others)
            rec.write("error", cell=cell["id"], error=f"{type(e).__name__}: {e}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
        else:
            row["cell"], row["cell_s"] = cell["id"], time.time() - t0
            rec.write("row", **row)
        done[cell["id"]] = time.time() - t0


def part_train(a, rec, deadline: float) -> None:
    torch, device = _setup_child(a)
    from train_throughput import build, lightning_run, make_loader

    from nanollada.lm import LM_CLASSES
    oom_types = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})
    peak = peak_tflops(_device_name(torch, device), a.peak_tflops)
    if a.compile_backend != "inductor":  # the modules call torch.compile(model): give it this backend
        torch.compile = functools.partial(torch.compile, backend=a.compile_backend)
    cells = [{"id": f"{name} {'compile' if c else 'eager'}", "paradigm": name, "compile": c}
             for c in a.compile_modes for name in LM_CLASSES]
    rec.write("plan", cells=[c["id"] for c in cells])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run(cell):
        B, L, halved = a.train_batch, a.train_seq_len, []
        while True:
            ns = SimpleNamespace(seed=a.seed, seq_len=L, lr=3e-4, warmup=a.train_warmup, compile=cell["compile"],
                                 steps=a.train_steps, precision=a.precision, grad_clip=1.0, log_every=50)
            lm = loader = None
            oom = False
            if cell["compile"]:
                torch._dynamo.reset()
            try:
                lm = build(a.preset, cell["paradigm"], ns)
                loader = make_loader(lm, B, L, device, seed=a.seed)
                if a._oom_above and B > a._oom_above:  # the test's stand-in for a batch that does not fit
                    raise oom_types[0](f"simulated: batch {B} > --_oom_above {a._oom_above}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                seconds = lightning_run(lm, loader, ns, device)
                sync()
                wall = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                # torch.compile may wrap an OOM met while compiling (BackendCompilerFailed: ... out of memory)
                if not (isinstance(e, oom_types) or "out of memory" in str(e).lower()):
                    raise
                oom = True
            if not oom:
                break
            lm = loader = None
            gc.collect()
            torch.cuda.empty_cache()
            if B == 1:
                raise RuntimeError("out of memory at batch 1")
            halved.append(B)
            B //= 2
        flops_step = lm.flops_per_batch  # the module's own count for its last training batch (2L for block diffusion)
        tflops = flops_step * a.train_steps / seconds / 1e12
        row = dict(preset=a.preset, paradigm=cell["paradigm"], lm_class=type(lm).__name__, compile=cell["compile"],
                   compile_backend=a.compile_backend if cell["compile"] else None,
                   precision=a.precision, params=lm.model.num_params(), batch=B, seq_len=L, steps=a.train_steps,
                   warmup=a.train_warmup, tok_s=a.train_steps * B * L / seconds, step_ms=1e3 * seconds / a.train_steps,
                   flops_per_token=flops_step / (B * L), tflops=tflops, mfu=tflops / peak if peak else None,
                   peak_tflops=peak, setup_s=wall - seconds, oom_halved_from=halved,
                   peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
        del lm, loader
        gc.collect()
        return row

    def estimate(cell, done):  # the slowest finished cell of the same mode (compile costs more than eager)
        same = [s for cid, s in done.items() if cid.endswith("compile" if cell["compile"] else "eager")]
        return max(same, default=0.0)

    _run_cells(cells, rec, deadline, estimate, run)


def decode_args(a) -> SimpleNamespace:
    """``benchmarks/decode_speed.py``'s settings for this check: every registered strategy, semi-AR blocks of
    ``--block_length``, the paradigms' caches on and off, one token per step for the fixed-step strategies."""
    from nanollada.sampling.diffusion import STRATEGIES
    return SimpleNamespace(gen_lengths=[a.gen_length], block_length=a.block_length, steps=None, threshold=a.threshold,
                           commit_top_k=a.commit_top_k, budget=None, seed=a.seed, strategies=list(STRATEGIES),
                           layouts=["semi-AR"], only=None)


def part_decode(a, rec, deadline: float) -> None:
    torch, device = _setup_child(a)
    from decode_speed import measure, methods, random_interfaces

    from nanollada.tokenizer import Tokenizer

    tok = Tokenizer(None)
    interfaces = random_interfaces(a.preset, tok, max(64, a.prompt_len + a.gen_length), device,
                                   dtype=getattr(torch, a.decode_dtype), seed=a.seed)
    ms = methods(interfaces, decode_args(a))  # from the registries: every paradigm x strategy x cache on/off
    cells = [{"id": f"{m.name} B={B}", "method": m, "batch": B} for B in a.decode_batch_sizes for m in ms]
    rec.write("plan", cells=["warm-up"] + [c["id"] for c in cells])
    g = torch.Generator().manual_seed(a.seed)
    prompts = {B: torch.randint(7, tok.vocab_size, (B, a.prompt_len), generator=g).to(device)
               for B in a.decode_batch_sizes}

    def warm(_):  # every method once at batch 1, one block (allocator, kernels, lazy init)
        for m in ms:
            measure(m, interfaces[m.paradigm], prompts[min(prompts)][:1], a.block_length, 1)
        return {"warm_up_only": True, "methods": len(ms)}

    def run(cell):
        m = cell["method"]
        r = measure(m, interfaces[m.paradigm], prompts[cell["batch"]], a.gen_length, 1)
        return dict(r, dtype=a.decode_dtype, preset=a.preset, prompt_len=a.prompt_len, block_length=a.block_length)

    def estimate(cell, done):  # the same method at the previous batch size (CPU time grows with the batch)
        if cell["id"] == "warm-up":
            return 0.0
        smaller = [B for B in a.decode_batch_sizes if B < cell["batch"]]
        if not smaller:
            return 0.0
        prev = done.get(f"{cell['method'].name} B={max(smaller)}", 0.0)
        return prev * ((cell["batch"] / max(smaller)) ** 0.5 if device.type == "cpu" else 1.0)

    _run_cells([{"id": "warm-up"}], rec, deadline, estimate, warm)
    _run_cells(cells, rec, deadline, estimate, run)


def _device_name(torch, device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
    except OSError:
        model = None
    return f"CPU {model or platform.machine()} ({os.cpu_count()} cores)"


# ====================================================================== parent side
def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a child started with start_new_session (its own process group: compile workers, DDP ranks)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # nothing to clean up: every record is already flushed
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_child(cmd: list[str], deadline: float, log_path: Path, records: Path | None = None, on_record=None,
              threads: int | None = None) -> dict:
    """Run cmd (stdout+stderr to log_path) until it exits or the deadline; relay new records while waiting.

    ``threads`` (CPU): OpenMP/MKL threads, and inductor compiles in-process (no pool of worker processes, each of
    which would import torch first)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    t0, offset, killed = time.time(), 0, False
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            while True:
                rc = proc.poll()
                if records is not None and records.exists():
                    with open(records, encoding="utf-8") as fh:
                        fh.seek(offset)
                        chunk = fh.read()
                    complete = chunk[: chunk.rfind("\n") + 1]
                    offset += len(complete.encode("utf-8"))
                    for line in complete.splitlines():
                        on_record(json.loads(line))
                if rc is not None:
                    break
                if time.time() >= deadline:
                    killed = True
                    _kill_group(proc)
                    break
                time.sleep(0.25)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
    return {"rc": proc.returncode, "killed": killed, "seconds": time.time() - t0}


def log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def run_child_part(part: str, a, argv: list[str], deadline: float, out: Path) -> dict:
    records = out / f"{part}.records.jsonl"
    records.unlink(missing_ok=True)
    res = {"part": part, "rows": [], "cut": [], "errors": [], "notes": [], "plan": []}
    running = {}  # the cell in progress: id, child time it started

    def on_record(r):
        kind = r.pop("type")
        if kind == "plan":
            res["plan"] = r["cells"]
            res["startup_s"] = r["t"]  # imports and model building before the first cell
        elif kind == "start":
            running.update(cell=r["cell"], since=time.time())
        elif kind == "row":
            if r.get("warm_up_only"):
                res["warm_up_s"] = r["cell_s"]
                return
            res["rows"].append(r)
            say(f"{part}: {r['cell']}: " + (f"{r['tok_s']:,.0f} tok/s" if "tok_s" in r else "done")
                + f" ({r['cell_s']:.1f} s)")
        elif kind == "cut":
            res["cut"].append(r)
            say(f"{part}: {r['cell']}: cut ({r['reason']})")
        elif kind == "error":
            res["errors"].append(r)
            say(f"{part}: {r['cell']}: ERROR {r['error']}")
        else:
            res["notes"].append(r["note"])
            say(f"{part}: {r['note']}")

    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--_part", part, "--_deadline", f"{deadline:.3f}",
           "--_records", str(records)]
    run = run_child(cmd, deadline, out / f"{part}.log", records, on_record, a.threads)
    accounted = {r["cell"] for r in res["rows"] + res["cut"] + res["errors"]} | ({"warm-up"} if "warm_up_s" in res
                                                                                 else set())
    for cell in res["plan"]:
        if cell in accounted:
            continue
        if not run["killed"]:
            reason = f"the part's process ended (rc {run['rc']}) before it"
        elif cell == running.get("cell"):
            reason = f"killed at the part's cap, {time.time() - running['since']:.0f} s into this cell"
        else:
            reason = "not started: killed at the part's cap"
        res["cut"].append({"cell": cell, "reason": reason})
    if not res["plan"]:  # died or was killed before planning: the whole part is cut / failed
        reason = ("killed at the part's cap before it planned its cells" if run["killed"] else
                  f"the part's process failed (rc {run['rc']}) before planning: {log_tail(out / f'{part}.log', 800)}")
        (res["cut"] if run["killed"] else res["errors"]).append({"cell": part, "reason": reason, "error": reason})
    if run["rc"] not in (0, None) and not run["killed"] and res["plan"]:
        res["errors"].append({"cell": part, "error": f"rc {run['rc']}: {log_tail(out / f'{part}.log', 800)}"})
    res.update(seconds=run["seconds"], killed=run["killed"], rc=run["rc"])
    return res


def part_fsdp(a, n_gpus: int, deadline: float, out: Path) -> dict:
    """nanollada fit of the FSDP config (tiny overrides) and nanollada predict of its checkpoint, as subprocesses."""
    import yaml

    d = out / "fsdp"
    for stale in (d / "checkpoints", d / "logs", d / "predict.jsonl"):  # an earlier run's files must not count
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    d.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(FSDP_CONFIG.read_text())
    tr = cfg["trainer"]
    on_gpu = a.device == "cuda"
    strategy = tr["strategy"]["class_path"].rsplit(".", 1)[-1]
    notes = []
    if on_gpu:
        tr.update(accelerator="gpu", devices=n_gpus, precision=a.precision)
    else:
        tr.update(accelerator="cpu", devices=1, strategy="auto", precision=a.precision)
        notes.append(f"CPU: Lightning runs {strategy} only on CUDA, so this is the FSDP config with its strategy "
                     f"replaced by a single-device one ({a.precision}); on a GPU it is {strategy}")
        strategy = "SingleDeviceStrategy (CPU stand-in for FSDP)"
    tr.update(max_steps=a.fsdp_steps, val_check_interval=a.fsdp_steps, limit_val_batches=2, log_every_n_steps=1,
              accumulate_grad_batches=1, enable_progress_bar=False)
    tr["logger"]["init_args"].update(save_dir=str(d / "logs"), name="fsdp", version=0)
    ckpt_dir = d / "checkpoints"
    for cb in tr["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"].update(dirpath=str(ckpt_dir), every_n_train_steps=a.fsdp_steps)
    cfg["model"]["init_args"].update(preset=a.preset, warmup_steps=1)
    cfg["data"].update(train_files=[str(REPO / "data" / "pretrain.jsonl")], data_root=None, cache_dir=str(d / "cache"),
                       batch_size=a.fsdp_batch, seq_len=a.fsdp_seq_len, num_workers=0, max_val_rows=64)
    config = d / "diffusion_pretrain_fsdp_check.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rows, cut, errors = [], [], []
    fit = run_child([sys.executable, "-m", "nanollada", "fit", "--config", str(config)], deadline, d / "fit.log",
                    threads=a.threads)
    ckpt = ckpt_dir / "last.ckpt"
    fit_row = dict(cell="fit", step="fit", strategy=strategy, devices=n_gpus if on_gpu else 1, precision=a.precision,
                   preset=a.preset, steps=a.fsdp_steps, batch=a.fsdp_batch, seq_len=a.fsdp_seq_len,
                   seconds=fit["seconds"], rc=fit["rc"], checkpoint=str(ckpt),
                   checkpoint_mb=ckpt.stat().st_size / 2**20 if ckpt.exists() else None)
    if fit["killed"]:
        cut += [{"cell": "fit", "reason": f"killed at the part's cap after {fit['seconds']:.0f} s"},
                {"cell": "predict", "reason": "not started: the fit was cut"}]
    elif fit["rc"] != 0 or not ckpt.exists():
        errors.append({"cell": "fit", "error": f"rc {fit['rc']}, checkpoint {'written' if ckpt.exists() else 'missing'}"
                       f": {log_tail(d / 'fit.log', 1500)}"})
        cut.append({"cell": "predict", "reason": "not started: the fit failed"})
    else:
        rows.append(fit_row)
        say(f"fsdp: fit {a.fsdp_steps} steps ({strategy}) in {fit['seconds']:.1f} s, checkpoint "
            f"{fit_row['checkpoint_mb']:.1f} MiB")
        pred_out = d / "predict.jsonl"
        pred = run_child([sys.executable, "-m", "nanollada", "predict", "--ckpt", str(ckpt), "--prompt",
                          "Once upon a time", "--max_new_tokens", "16", "--device", a.device, "--output",
                          str(pred_out)], deadline, d / "predict.log", threads=a.threads)
        recs = [json.loads(x) for x in pred_out.read_text(encoding="utf-8").splitlines()] if pred_out.exists() else []
        if pred["killed"]:
            cut.append({"cell": "predict", "reason": f"killed at the part's cap after {pred['seconds']:.0f} s"})
        elif pred["rc"] != 0 or not recs:
            errors.append({"cell": "predict", "error": f"rc {pred['rc']}: {log_tail(d / 'predict.log', 1500)}"})
        else:
            rows.append(dict(cell="predict", step="predict", strategy="-", devices=1, precision="checkpoint dtype",
                             preset=a.preset, seconds=pred["seconds"], rc=pred["rc"], tokens=recs[0].get("tokens"),
                             completion=recs[0].get("completion"), checkpoint=str(ckpt)))
            say(f"fsdp: predict reloaded the checkpoint in {pred['seconds']:.1f} s: {recs[0].get('completion')!r}")
    return {"part": "fsdp", "rows": rows, "cut": cut, "errors": errors, "notes": notes, "config": str(config),
            "plan": ["fit", "predict"]}


# ---------------------------------------------------------------------- tables
def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def train_table(rows) -> str:
    out = ["| paradigm | compile | precision | params | batch x seq | tokens/s | step ms | TFLOP/s | MFU | "
           "peak mem GiB | setup s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['paradigm']} | {r.get('compile_backend') or 'no'} | {r['precision']} | "
                   f"{r['params'] / 1e6:.2f}M | {r['batch']} x {r['seq_len']}"
                   f"{' (OOM from ' + str(r['oom_halved_from'][0]) + ')' if r['oom_halved_from'] else ''} | "
                   f"{r['tok_s']:,.0f} | "
                   f"{r['step_ms']:.1f} | {r['tflops']:.3f} | {_f(r['mfu'] and 100 * r['mfu'], '.1f')}"
                   f"{'%' if r['mfu'] else ''} | {_f(r['peak_mem_gib'], '.2f')} | {r['setup_s']:.1f} |")
    return "\n".join(out)


def fsdp_table(rows) -> str:
    out = ["| step | strategy | devices | precision | steps | seconds | result |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        result = (f"checkpoint {r['checkpoint_mb']:.1f} MiB" if r["step"] == "fit" and r.get("checkpoint_mb")
                  else f"{r.get('tokens')} tokens: {json.dumps(r.get('completion'), ensure_ascii=False)[:60]}")
        out.append(f"| {r['step']} | {r['strategy']} | {r['devices']} | {r['precision']} | {r.get('steps', '-')} | "
                   f"{r['seconds']:.1f} | {result} |")
    return "\n".join(out)


def decode_table(rows) -> str:
    out = ["| method | batch | gen | forwards | TPF | fed tokens / gen token | first token/round ms | total s | "
           "tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['batch']} | {r['generated']:g} | {r['forwards']} | {r['tpf']:.2f} | "
                   f"{r['fed_per_token']:.1f} | {r['first_ms']:.1f} | {r['seconds']:.3f} | {r['tok_s']:,.0f} |")
    return "\n".join(out)


TABLES = {"train": train_table, "fsdp": fsdp_table, "decode": decode_table}
TITLES = {"train": "Training throughput (Lightning path, random packed rows)",
          "fsdp": "FSDP config: nanollada fit + predict",
          "decode": "Decoding speed (random weights: forward costs are real, TPF is the worst case)"}


def markdown(report: dict) -> str:
    env = report["env"]
    count = f" x{env['device_count']}" if report["args"]["device"] == "cuda" else ""
    lines = [f"# nanollada GPU check: {env['date']}, {env['device_name']}{count}, torch {env['torch']}"
             + (f" (CUDA {env['cuda']})" if env.get("cuda") else ""),
             "", f"preset `{report['args']['preset']}`, budget {report['budget_s']:.0f} s, elapsed "
             f"{report['elapsed_s']:.0f} s; bf16 dense peak {_f(env['peak_tflops'], '.0f', 'unknown')} TFLOP/s"]
    for part in [p for p in SHOW if p in report["parts"]]:
        res = report["parts"][part]
        lines += ["", f"## {part}: {TITLES[part]} ({res['status']}, {res.get('seconds', 0):.0f} s of a "
                  f"{res.get('cap_s', 0):.0f} s cap)", ""]
        if res["rows"]:
            lines.append(TABLES[part](res["rows"]))
        for n in res["notes"]:
            lines.append(f"\nnote: {n}")
        for c in res["cut"]:
            lines.append(f"\ncut: {c['cell']} ({c['reason']})")
        for e in res["errors"]:
            lines.append(f"\nerror: {e['cell']}: {str(e.get('error'))[:500]}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--preset", default="base", choices=["tiny", "small", "base"])
    p.add_argument("--budget", type=float, default=480.0, help="total seconds, enforced (startup included)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    for part in PARTS:
        p.add_argument(f"--{part}_cap", type=float, default=None,
                       help=f"seconds for {part} (default {SHARES['cuda'][part]:.0%} of the budget on CUDA, "
                       f"{SHARES['cpu'][part]:.0%} on CPU, plus the time earlier parts left unused)")
    p.add_argument("--out", default="logs/gpu_check", help="output directory")
    p.add_argument("--precision", default=None, choices=["32-true", "bf16-mixed"],
                   help="training precision (default: bf16-mixed on CUDA, 32-true on CPU)")
    p.add_argument("--peak_tflops", type=float, default=None, help="bf16 dense peak for MFU (default: by name)")
    p.add_argument("--train_batch", type=int, default=None, help="rows per step to try first (halved on OOM)")
    p.add_argument("--train_seq_len", type=int, default=None)
    p.add_argument("--train_steps", type=int, default=None, help="timed steps")
    p.add_argument("--train_warmup", type=int, default=None, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile_modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--compile_backend", default=None, help="torch.compile backend of the compile mode (default: "
                   "inductor on CUDA, aot_eager on CPU)")
    p.add_argument("--fsdp_steps", type=int, default=None)
    p.add_argument("--fsdp_batch", type=int, default=None)
    p.add_argument("--fsdp_seq_len", type=int, default=None)
    p.add_argument("--decode_batch_sizes", nargs="+", type=int, default=[1, 16])
    p.add_argument("--gen_length", type=int, default=None)
    p.add_argument("--prompt_len", type=int, default=None, help="a multiple of --block_length")
    p.add_argument("--block_length", type=int, default=None, help="semi-AR / block-diffusion block")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--commit_top_k", type=int, default=4)
    p.add_argument("--decode_dtype", default=None, choices=["float32", "bfloat16"],
                   help="decoding weights (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads of every subprocess (default: "
                   "the torch default on CUDA, 1 on CPU, where the part runs share a few cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_records", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_oom_above", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulated OOM
    a = p.parse_args(argv)
    if a.device == "auto":
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    for k, v in DEFAULTS[a.device].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.compile_modes = [m == "compile" for m in dict.fromkeys(a.compile_modes)]
    if a.prompt_len % a.block_length or a.gen_length % a.block_length:
        p.error(f"--prompt_len {a.prompt_len} and --gen_length {a.gen_length} must be multiples of --block_length "
                f"{a.block_length} (every paradigm then generates exactly gen_length tokens)")
    if a.train_seq_len % a.block_length or a.fsdp_seq_len < 32:
        p.error("--train_seq_len must be a multiple of --block_length (block diffusion), --fsdp_seq_len >= 32")
    return a


def child_argv(a) -> list[str]:
    """The resolved settings as flags, so the children see exactly what the parent resolved."""
    argv = ["--device", a.device, "--preset", a.preset, "--precision", a.precision,
            "--compile_modes", *[("compile" if c else "eager") for c in a.compile_modes],
            "--decode_batch_sizes", *map(str, a.decode_batch_sizes), "--decode_dtype", a.decode_dtype,
            "--compile_backend", a.compile_backend]
    for k in ("train_batch", "train_seq_len", "train_steps", "train_warmup", "gen_length", "prompt_len",
              "block_length", "threshold", "commit_top_k", "seed", "threads", "peak_tflops", "_oom_above"):
        if getattr(a, k) is not None:
            argv += [f"--{k}", str(getattr(a, k))]
    return argv


def main(argv=None) -> int:
    t_start = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    if a._part:
        rec = Records(a._records, t_start)
        {"train": part_train, "decode": part_decode}[a._part](a, rec, a._deadline)
        return 0
    deadline = t_start + a.budget
    out = Path(a.out)
    if not out.is_absolute():
        out = REPO / out
    out.mkdir(parents=True, exist_ok=True)
    import torch
    device = torch.device(a.device)
    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    name = _device_name(torch, device)
    from importlib.metadata import version
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), device=a.device,
               device_name=name, device_count=max(n_gpus, 1), torch=torch.__version__, cuda=torch.version.cuda,
               lightning=version("lightning"), python=platform.python_version(), host_cpus=os.cpu_count(),
               peak_tflops=peak_tflops(name, a.peak_tflops))
    say(f"{env['date']}: {name} x{env['device_count']}, torch {env['torch']}, preset {a.preset}, "
        f"budget {a.budget:.0f} s, output {out}")
    avail = deadline - RESERVE_S - time.time()
    caps = {p: getattr(a, f"{p}_cap") or SHARES[a.device][p] * avail for p in a.parts}
    parts, carry = {}, 0.0
    for part in a.parts:
        t0 = time.time()
        part_deadline = min(t0 + caps[part] + carry, deadline - RESERVE_S)
        cap = part_deadline - t0
        if cap <= 1.0:
            res = {"part": part, "rows": [], "cut": [{"cell": part, "reason": "no budget left"}], "errors": [],
                   "notes": [], "plan": []}
        elif part == "fsdp":
            res = part_fsdp(a, n_gpus, part_deadline, out)
        else:
            res = run_child_part(part, a, child_argv(a), part_deadline, out)
        res["cap_s"], res["seconds"] = cap, time.time() - t0
        res["status"] = "error" if res["errors"] else "cut" if res["cut"] else "ok"
        carry = max(0.0, part_deadline - time.time())
        parts[part] = res
        say(f"{part}: {res['status']}, {len(res['rows'])} rows, {len(res['cut'])} cut, {res['seconds']:.0f} s "
            f"of {cap:.0f} s")
    report = {"env": env, "args": {k: v for k, v in vars(a).items() if not k.startswith("_")}, "budget_s": a.budget,
              "elapsed_s": time.time() - t_start, "parts": parts,
              "decode_source": f"random-init {a.preset} preset, {a.decode_dtype} (speed only: random weights)"}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    for part in ("train", "decode"):
        if part in parts:
            shaped = {"args": report["args"], "device": a.device, "device_name": name, "rows": parts[part]["rows"]}
            if part == "decode":
                shaped["source"] = report["decode_source"]
            (out / f"{part}.json").write_text(json.dumps(shaped, indent=1, default=str))
    md = markdown(report)
    (out / "gpu_check.md").write_text(md)
    print(md)
    say(f"wrote {out}/gpu_check.json and gpu_check.md in {time.time() - t_start:.0f} s (budget {a.budget:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
