"""Crashes lose nothing: a SIGKILLed `nanollada fit` resumes with the uninterrupted run's losses, an interrupted
checkpoint write leaves the previous checkpoint loadable, and a checkpoint from another tokenizer is refused.

(a) For the tiny AR, the tiny diffusion and the tiny block-diffusion conversion config, run A trains 30 steps uninterrupted while run B (the same config)
is killed with SIGKILL once a checkpoint exists; B is then resumed with ``--ckpt_path last`` and its per-step
``train/loss`` (log_every_n_steps=1) and final weights must be A's. Both paradigms derive the data position from
the global step; diffusion also seeds each step's masks from (noise_seed, step, rank). The cosine schedule is over
``max_steps``, the same for A and B, so nothing else has to be held constant. Six fits start at once (one intra-op
thread each), then the three resumes.
(b) ``AtomicCheckpointIO``: a write that raises (or is SIGKILLed) midway never touches the previous file.
(c) ``LanguageModel.load_weights_from`` (what ``init_from`` runs when a fit starts) with a checkpoint of another
    tokenizer: ValueError.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, check_ok, english_lines, finish, fit_config, scalars, start_cli, write_jsonl

STEPS = 30
# CPU even where a GPU exists: bit-reproducible steps, and slow enough that the kill lands mid-run.
TRAINER = dict(max_steps=STEPS, val_check_interval=1000, limit_val_batches=0, log_every_n_steps=1, accelerator="cpu")
MODEL = dict(warmup_steps=5)  # cosine over max_steps, as in the shipped configs
DATA_ARGS = dict(seq_len=64, batch_size=4)
CKPT = dict(every_n_train_steps=10)
BASES = {"ar": CONFIGS / "tiny" / "ar_pretrain.yaml", "diffusion": CONFIGS / "tiny" / "diffusion_pretrain.yaml",
         "block_diffusion": CONFIGS / "tiny" / "block_diffusion_from_ar.yaml"}
# block diffusion: the conversion config, so the block-size schedule (a function of the step) is resumed too
OVERRIDES = {"block_diffusion": dict(init_from=None, block_size=16, block_schedule={
    "class_path": "nanollada.lm.BlockSizeSchedule", "init_args": {"warmup_sizes": [1, 4], "warmup_steps": 10,
                                                                   "stable_steps": 10, "decay_sizes": [16],
                                                                   "decay_steps": 10}})}


def kill_after_checkpoint(procs: dict, ckpt_dirs: dict, timeout: float = 180) -> None:
    """SIGKILL each process shortly after its first last.ckpt appears (atomic writes: complete once it exists)."""
    deadline, seen = time.monotonic() + timeout, {}
    while len(seen) < len(procs) or any(k not in seen or procs[k].returncode is None for k in procs):
        now = time.monotonic()
        for k, proc in procs.items():
            if proc.returncode is not None:
                continue
            if k not in seen and (ckpt_dirs[k] / "last.ckpt").exists():
                seen[k] = now
            if proc.poll() is not None:
                pytest.fail(f"{k} finished (rc {proc.returncode}) before it could be killed:\n"
                            f"{proc.communicate()[1][-3000:]}")
            if k in seen and now - seen[k] > 0.3:  # train past the checkpoint: those steps must be redone
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
        if now > deadline:
            for proc in procs.values():
                proc.kill()
            pytest.fail("no checkpoint appeared in time")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("fault")
    corpus = write_jsonl(work / "corpus.jsonl", [{"text": t} for t in english_lines(600, seed=3, words=40)])
    cache = work / "cache"
    cfgs = {}
    for p, base in BASES.items():
        for name in ("A", "B"):
            cfgs[p, name] = fit_config(work / p / name, name=name, base=base, trainer=TRAINER,
                                       model={**MODEL, **OVERRIDES.get(p, {})}, data=DATA_ARGS, checkpoint=CKPT, train_files=[corpus], cache_dir=cache)
    from nanollada.data.cache import build_cache  # one shared token cache, built before the processes race for it
    from nanollada.tokenizer import Tokenizer
    build_cache(str(corpus), "pretrain", Tokenizer(), str(cache),
                yaml.safe_load(cfgs["ar", "A"].read_text())["data"]["val_fraction"], log=lambda *_: None)
    procs = {k: start_cli(["fit", "--config", c], cwd=c.parent) for k, c in cfgs.items()}
    kill_after_checkpoint({p: procs[p, "B"] for p in BASES}, {p: work / p / "B" / "checkpoints" for p in BASES})
    resumed_from, resumes = {}, {}
    for p in BASES:
        assert procs[p, "B"].returncode == -signal.SIGKILL, procs[p, "B"].returncode
        resumed_from[p] = torch.load(work / p / "B" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        b2 = fit_config(work / p / "B", name="B2", base=BASES[p], ckpt_dir=work / p / "B" / "checkpoints",
                        trainer=TRAINER, model={**MODEL, **OVERRIDES.get(p, {})}, data=DATA_ARGS, checkpoint=CKPT,
                        train_files=[corpus], cache_dir=cache)
        resumes[p] = start_cli(["fit", "--config", b2, "--ckpt_path", "last"], cwd=work / p / "B")
    out = {"work": work, "resumed_from": resumed_from}
    for p in BASES:
        out[p, "A"] = finish(procs[p, "A"], timeout=300)
        out[p, "B2"] = finish(resumes[p], timeout=300)
        check_ok(out[p, "A"], f"uninterrupted {p} run")
        check_ok(out[p, "B2"], f"resumed {p} run")
    return out


@pytest.mark.parametrize("paradigm", list(BASES))
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(runs, paradigm):
    work, k = runs["work"] / paradigm, runs["resumed_from"][paradigm]
    assert 10 <= k < STEPS, k  # killed after a checkpoint, before the end
    r = runs[paradigm, "B2"]
    assert "Restored all states" in r.stdout + r.stderr
    a = scalars(work / "A" / "logs" / "A" / "version_0", "train/loss")
    b2 = scalars(work / "B" / "logs" / "B2" / "version_0", "train/loss")
    assert sorted(a) == list(range(STEPS))
    assert sorted(b2) == list(range(k, STEPS)), "the resumed run must start at the checkpoint's step"
    for s in range(k, STEPS):
        assert b2[s] == pytest.approx(a[s], rel=1e-5, abs=1e-5), (s, a[s], b2[s])
    if paradigm in OVERRIDES:  # the block-size schedule is resumed exactly (1, 4, then 64, then 16)
        sizes_a = scalars(work / "A" / "logs" / "A" / "version_0", "train/block_size")
        sizes_b2 = scalars(work / "B" / "logs" / "B2" / "version_0", "train/block_size")
        assert sizes_b2 == {s: v for s, v in sizes_a.items() if s >= k}
        assert [sizes_a[s] for s in (0, 5, 10, 25)] == [1, 4, 64, 16]
    # the killed run's own log agrees with A up to where it was killed (same seed, same order)
    b = scalars(work / "B" / "logs" / "B" / "version_0", "train/loss")
    assert min(b) == 0 and all(b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-5) for s in b)
    full = torch.load(work / "A" / "checkpoints" / "last.ckpt", weights_only=True)
    last = torch.load(work / "B" / "checkpoints" / "last.ckpt", weights_only=True)
    assert full["global_step"] == last["global_step"] == STEPS
    assert last["nanollada"]["paradigm"] == paradigm
    for name, w in full["state_dict"].items():
        torch.testing.assert_close(last["state_dict"][name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # every visible file is a complete checkpoint (a kill mid-write could leave only a hidden .*.tmp file)
    for f in (work / "B" / "checkpoints").iterdir():
        if not f.name.startswith("."):
            assert f.suffix == ".ckpt"
            torch.load(f, weights_only=True)


# ------------------------------------------------------------------------------------------ (b) atomic writes
def _payload(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"global_step": step, "state_dict": {"w": torch.randn(64, 64, generator=g)}}


def _partial_save(real_save, exc):
    def save(obj, f, *args, **kwargs):
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half a checkpoint reaches the temp file...
        f.flush()
        raise exc  # ...then the write dies
    return save


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch, exc):
    from nanollada.checkpoint import AtomicCheckpointIO
    io_ = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io_.save_checkpoint(_payload(1), target)
    before = target.read_bytes()
    monkeypatch.setattr(torch, "save", _partial_save(torch.save, exc))
    with pytest.raises(type(exc)):
        io_.save_checkpoint(_payload(2), target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    loaded = torch.load(target, weights_only=True)
    assert loaded["global_step"] == 1
    torch.testing.assert_close(loaded["state_dict"]["w"], _payload(1)["state_dict"]["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the temp file was removed
    assert io_.load_checkpoint(target)["global_step"] == 1
    io_.save_checkpoint(_payload(3), target)  # and the next write works
    assert torch.load(target, weights_only=True)["global_step"] == 3


def test_sigkill_mid_write_keeps_previous_checkpoint(tmp_path):
    """A process killed inside the write cannot clean up: the temp file stays, but it is hidden, is not a .ckpt
    (so ``--ckpt_path last`` never picks it), and the previous checkpoint is intact."""
    target = tmp_path / "last.ckpt"
    script = textwrap.dedent(f"""
        import io, os, signal, torch
        from nanollada.checkpoint import atomic_torch_save
        atomic_torch_save({{"global_step": 1, "w": torch.ones(256, 256)}}, {str(target)!r})
        real = torch.save
        def dying_save(obj, f, *a, **k):
            buf = io.BytesIO(); real(obj, buf)
            f.write(buf.getvalue()[:100_000]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        atomic_torch_save({{"global_step": 2, "w": torch.zeros(256, 256)}}, {str(target)!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    loaded = torch.load(target, weights_only=True)
    assert loaded["global_step"] == 1 and bool((loaded["w"] == 1).all())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.") and leftovers[0].endswith(".tmp")
    from lightning.pytorch.callbacks import ModelCheckpoint
    found = ModelCheckpoint(dirpath=tmp_path)._find_last_checkpoints(trainer=None)
    assert found == {os.path.normpath(target)}


# ------------------------------------------------------------------------------------------ (c) tokenizer guard
def test_checkpoint_of_another_tokenizer_is_refused(runs, tiny_tokenizer_path):
    from nanollada.lm import ARLM
    ckpt = runs["work"] / "ar" / "A" / "checkpoints" / "last.ckpt"
    model = ARLM(preset="tiny", max_seq_len=128, tokenizer=str(tiny_tokenizer_path))
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(ValueError, match="tokenizer"):
        model.load_weights_from(str(ckpt))
    for k, v in model.model.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k]), k
    # the same checkpoint with its own tokenizer loads
    report = ARLM(preset="tiny", max_seq_len=128).load_weights_from(str(ckpt))
    assert not report["missing"] and not report["shape_mismatch"]
