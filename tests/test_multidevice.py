"""Data-parallel training is the single-process run with the doubled batch.

Two CPU processes (``strategy: ddp``, ``accelerator: cpu``, ``devices: 2``: Lightning's subprocess launcher re-runs
``python -m nanollada fit ...`` once per extra rank and DDP all-reduces gradients over the gloo backend) with b rows
each train the tiny AR model for a few steps; one process with 2b rows trains the same config. The results must match.

Why they are the same computation:

- Data. ``LMDataModule`` builds its own ``MixtureSampler(start, rank, world_size)`` (the CLI sets
  ``use_distributed_sampler: false``): rank r reads global stream positions p = r, r + 2, r + 4, ... and batches b
  consecutive ones of its sub-stream, so at step s rank r holds positions {2(bs + j) + r : j < b} and the union over
  both ranks is [2bs, 2b(s + 1)): exactly the rows of the single process's step-s batch (in another order).
- Gradients. Packed pretraining rows all have seq_len targets, so each rank's loss (a per-batch mean) weighs every
  token equally; DDP averages the two ranks' gradients, which is the gradient of the mean over the doubled batch.
  Clipping, AdamW and the LR schedule then act on identical gradients. Only float summation order differs.
- Initialisation. ``seed_everything: 0`` runs before the model is built in every process (and DDP broadcasts rank
  0's weights anyway).

The DDP run is the shipped ``configs/multi_gpu/ar_pretrain_ddp.yaml`` (``DDPStrategy``), shrunk to the tiny preset in
fp32 on CPU; the single-process run is the same file with ``devices: 1, strategy: auto``. ``ddp`` rather than
``ddp_spawn``: it works from the CLI on CPU without pickling the LightningCLI objects, and it is what the GPU
config uses. The tolerance (1e-4 absolute on weights after 4 AdamW steps; measured ~2e-5) is ~100x below the gap to a
run that sees only one rank's rows (~1e-2).
"""

import time

import pytest
import torch
import yaml

from conftest import CONFIGS, DATA, check_ok, finish, fit_config, scalars, start_cli

DDP_CONFIG = CONFIGS / "multi_gpu" / "ar_pretrain_ddp.yaml"
STEPS, B, SEQ = 4, 4, 32
# The shipped DDP config, shrunk: tiny preset, fp32 on CPU (gloo), no accumulation, no validation, no workers.
TRAINER = dict(max_steps=STEPS, val_check_interval=1000, limit_val_batches=0, log_every_n_steps=1,
               accelerator="cpu", precision="32-true", accumulate_grad_batches=1, enable_progress_bar=False)
MODEL = dict(preset="tiny", warmup_steps=2, lr=3e-3)
DATA_ARGS = dict(seq_len=SEQ, num_workers=0)
CKPT = dict(every_n_train_steps=STEPS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    cache = work / "cache"
    single = fit_config(work / "single", name="single", base=DDP_CONFIG, trainer={**TRAINER, "devices": 1,
                        "strategy": "auto"}, model=MODEL, data={**DATA_ARGS, "batch_size": 2 * B}, checkpoint=CKPT,
                        cache_dir=cache)
    ddp = fit_config(work / "ddp", name="ddp", base=DDP_CONFIG, trainer={**TRAINER, "devices": 2}, model=MODEL,
                     data={**DATA_ARGS, "batch_size": B}, checkpoint=CKPT, cache_dir=cache)
    assert yaml.safe_load(ddp.read_text())["trainer"]["strategy"]["class_path"].endswith("DDPStrategy")
    from nanollada.data.cache import build_cache
    from nanollada.tokenizer import Tokenizer
    build_cache(str(DATA / "pretrain.jsonl"), "pretrain", Tokenizer(), str(cache),
                yaml.safe_load(single.read_text())["data"]["val_fraction"], log=lambda *_: None)
    t0 = time.perf_counter()
    procs = {"single": start_cli(["fit", "--config", single], cwd=work / "single"),
             "ddp": start_cli(["fit", "--config", ddp], cwd=work / "ddp")}
    results = {k: finish(p, timeout=180) for k, p in procs.items()}
    for k, r in results.items():
        assert r.returncode == 0, f"{k} run failed (rc {r.returncode}):\n{r.stderr[-4000:]}"
    return {"single": work / "single", "ddp": work / "ddp", "results": results, "seconds": time.perf_counter() - t0,
            "work": work, "cache": cache}


def test_ddp_uses_two_gloo_processes(runs):
    out = runs["results"]["ddp"].stdout + runs["results"]["ddp"].stderr
    assert "distributed_backend=gloo" in out, out[-3000:]
    assert "All distributed processes registered. Starting with 2 processes" in out, out[-3000:]


def test_ddp_matches_single_process_with_doubled_batch(runs):
    one = torch.load(runs["single"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    two = torch.load(runs["ddp"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert one["global_step"] == two["global_step"] == STEPS
    for name, w1 in one["state_dict"].items():
        w2 = two["state_dict"][name]
        torch.testing.assert_close(w2, w1, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    # Adam's moments integrate the gradients of every step: equal moments mean equal gradients at every step.
    s1, s2 = one["optimizer_states"][0]["state"], two["optimizer_states"][0]["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s2[k]["exp_avg"], s1[k]["exp_avg"], rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(s2[k]["exp_avg_sq"], s1[k]["exp_avg_sq"], rtol=1e-3, atol=1e-12)


def test_step_count_and_data_position(runs):
    """The DDP run consumed 2 x b rows per step; a resume would skip global_step x b x world_size positions."""
    two = torch.load(runs["ddp"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert two["global_step"] == STEPS
    from nanollada.data.datamodule import MixtureSampler
    sizes = [1000]
    ranks = [MixtureSampler(sizes, [1.0], seed=0, rank=r, world_size=2) for r in range(2)]
    full = MixtureSampler(sizes, [1.0], seed=0)
    streams = [iter(s) for s in ranks]
    one = iter(full)
    for _ in range(3):  # per step: b rows from each rank == the next 2b rows of the single stream, as sets
        got = [next(streams[r]) for r in range(2) for _ in range(B)]
        want = [next(one) for _ in range(2 * B)]
        assert sorted(got) == sorted(want)
    resumed = MixtureSampler(sizes, [1.0], seed=0, start=3 * B * 2, rank=1, world_size=2)
    assert next(iter(resumed)) == next(streams[1])


# ---------------------------------------------------------------------------------------------- validation metrics
VAL_ROWS = 21  # odd: the two ranks' shards differ in size (11 and 10 rows)


@pytest.fixture(scope="module")
def validated(runs):
    """`nanollada validate` of one checkpoint on 1 and on 2 gloo processes (each rank scores its own shard), and a
    2-process fit with ``nonfinite_loss: skip`` (refused), all three at once."""
    work, ckpt = runs["work"], runs["single"] / "checkpoints" / "last.ckpt"
    cfgs = {n: fit_config(work / n, name=n, base=DDP_CONFIG, cache_dir=runs["cache"], model=MODEL, checkpoint=CKPT,
                          trainer={**TRAINER, "limit_val_batches": 1.0, "devices": d,
                                   **({} if d > 1 else {"strategy": "auto"})},
                          data={**DATA_ARGS, "batch_size": B, "max_val_rows": VAL_ROWS})
            for n, d in (("val1", 1), ("val2", 2))}
    skip = fit_config(work / "skip", name="skip", base=DDP_CONFIG, cache_dir=runs["cache"], checkpoint=CKPT,
                      trainer={**TRAINER, "devices": 2}, model={**MODEL, "nonfinite_loss": "skip"},
                      data={**DATA_ARGS, "batch_size": B})
    procs = {n: start_cli(["validate", "--config", c, "--ckpt_path", ckpt], cwd=work / n) for n, c in cfgs.items()}
    procs["skip"] = start_cli(["fit", "--config", skip], cwd=work / "skip")
    # The diffusion paradigms score a Monte-Carlo ELBO: the masks must follow the row, not the batch or the rank.
    # Their freshly initialised tiny models (seed_everything: 0 in every process) are validated without a checkpoint.
    diffusion = {}
    for kind in ("diffusion", "block_diffusion"):
        for d in (1, 2):
            n = f"{kind}_val{d}"
            diffusion[n] = fit_config(work / n, name=n, base=CONFIGS / "tiny" / f"{kind}_pretrain.yaml",
                                      cache_dir=work / "cache_diffusion", checkpoint=CKPT,
                                      trainer={"limit_val_batches": 1.0, "devices": d, "accelerator": "cpu",
                                               "strategy": "ddp" if d > 1 else "auto"},
                                      data={"batch_size": B, "max_val_rows": VAL_ROWS, "num_workers": 0})
    for n, c in diffusion.items():
        procs[n] = start_cli(["validate", "--config", c], cwd=work / n)
    out = {n: finish(p, timeout=300) for n, p in procs.items()}
    for n in [*cfgs, *diffusion]:
        check_ok(out[n], f"validate {n}")
    return {n: {t: scalars(work / n / "logs" / n / "version_0", t) for t in ("val/nll", "val/tokens", "val/ppl")}
            for n in [*cfgs, *diffusion]} | {"skip": out["skip"], "val2_out": out["val2"]}


def test_two_process_validation_matches_one_process(validated):
    one, two = validated["val1"], validated["val2"]
    out = validated["val2_out"].stdout + validated["val2_out"].stderr
    assert "Starting with 2 processes" in out, out[-3000:]
    # every validation row scored exactly once over the two ranks: packed rows have SEQ targets each
    assert one["val/tokens"] == two["val/tokens"] == {0: VAL_ROWS * SEQ}
    assert two["val/nll"][0] == pytest.approx(one["val/nll"][0], rel=1e-5)
    assert two["val/ppl"][0] == pytest.approx(one["val/ppl"][0], rel=1e-4)


@pytest.mark.parametrize("kind", ["diffusion", "block_diffusion"])
def test_two_process_diffusion_validation_matches_one_process(validated, kind):
    """The ELBO's masks are drawn per validation row (seeded by its global index), so 2 ranks scoring disjoint
    shards in other batches give the single process's val/nll -- not the same masks replayed on every rank."""
    one, two = validated[f"{kind}_val1"], validated[f"{kind}_val2"]
    assert one["val/tokens"] == two["val/tokens"] and one["val/tokens"][0] > 0
    assert two["val/nll"][0] == pytest.approx(one["val/nll"][0], rel=1e-5)


def test_eval_loader_shards_rows_by_rank(tmp_path):
    """Rank r of W validates rows r, r + W, r + 2W, ... of the (capped) validation set: a partition, in order."""
    from types import SimpleNamespace

    from nanollada.data.datamodule import LMDataModule
    from nanollada.lm import ARLM
    dm = LMDataModule([str(DATA / "pretrain.jsonl")], seq_len=SEQ, batch_size=3, val_fraction=0.05, max_val_rows=10,
                      cache_dir=str(tmp_path / "cache"))
    dm.setup("validate")
    module = ARLM(preset="tiny", max_seq_len=64)
    full = [row["tokens"] for row in dm.val_set]
    shards = []
    for rank in range(3):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=3, lightning_module=module)
        shards.append([row["tokens"] for row in dm.val_dataloader().dataset])
    assert [len(s) for s in shards] == [4, 3, 3]
    for rank, shard in enumerate(shards):
        assert all(torch.equal(a, b) for a, b in zip(shard, full[rank::3], strict=True))


@pytest.mark.parametrize("kind", ["MaskedDiffusionLM", "BlockDiffusionLM"])
def test_diffusion_validation_masks_follow_the_row_not_the_batch(tmp_path, kind):
    """Summed over the validation set, the Monte-Carlo ELBO is the same for any batch size and any rank split: each
    row's masks come from its own generator (seeded by its global index) and never depend on its batch."""
    from types import SimpleNamespace

    import nanollada.lm as lm
    from nanollada.data.datamodule import LMDataModule
    torch.manual_seed(0)
    module = getattr(lm, kind)(preset="tiny", max_seq_len=64).eval()
    sums = {}
    for batch_size, world in ((2, 1), (5, 1), (3, 2)):
        dm = LMDataModule([str(DATA / "pretrain.jsonl")], seq_len=SEQ, batch_size=batch_size, val_fraction=0.05,
                          max_val_rows=9, cache_dir=str(tmp_path / "cache"))
        dm.setup("validate")
        nll = tokens = 0.0
        for rank in range(world):
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, lightning_module=module)
            for i, batch in enumerate(dm.val_dataloader()):
                assert batch["row_index"].tolist() == list(range(rank, 9, world))[i * batch_size:(i + 1) * batch_size]
                with torch.no_grad():
                    n, t = module.eval_sums(module.transfer_batch_to_device(batch, module.device, 0), i)
                nll, tokens = nll + float(n), tokens + float(t)
        sums[(batch_size, world)] = (nll, tokens)
    (nll0, tok0), *rest = sums.values()
    for nll, tok in rest:
        assert tok == tok0
        assert nll == pytest.approx(nll0, rel=1e-5)


def test_nonfinite_skip_is_refused_on_several_devices(validated):
    r = validated["skip"]
    assert r.returncode != 0
    assert "nonfinite_loss: skip is not supported with several devices" in r.stderr, r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- predict
def test_two_process_predict_writes_every_prompt_once_in_order(runs):
    """`nanollada predict --config` on 2 gloo processes: each rank decodes its share (prompts r, r + 2, ...), the
    writer merges the ranks' parts by prompt index; the records equal the single-process run's."""
    work, ckpt = runs["work"], runs["single"] / "checkpoints" / "last.ckpt"
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(7)), encoding="utf-8")
    procs, outs = {}, {}
    for n, d in (("pred1", 1), ("pred2", 2)):
        cfg = fit_config(work / n, name=n, base=DDP_CONFIG, cache_dir=runs["cache"], model=MODEL,
                         trainer={**TRAINER, "devices": d, **({} if d > 1 else {"strategy": "auto"})},
                         data={**DATA_ARGS, "batch_size": 2})
        outs[n] = work / n / "out.jsonl"
        procs[n] = start_cli(["predict", "--config", cfg, "--ckpt_path", ckpt, "--data.predict_file", prompts,
                              "--output", outs[n], "--generation.max_new_tokens", "6", "--generation.temperature",
                              "0"], cwd=work / n)
    for n, p in procs.items():
        check_ok(finish(p, timeout=180), f"predict {n}")
    import json
    one, two = ([json.loads(line) for line in outs[n].read_text().splitlines()] for n in ("pred1", "pred2"))
    assert [r["index"] for r in two] == list(range(7)) and [r["prompt"] for r in two] == [r["prompt"] for r in one]
    assert [r["completion"] for r in two] == [r["completion"] for r in one]
    assert not list((work / "pred2").glob(".out.jsonl*"))
