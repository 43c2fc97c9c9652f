"""Training options with exact expectations: the LR schedule's values, ``random_length_prob``, ``embed_noise_std``,
``compile: true`` and ``bf16-mixed`` precision on CPU for both paradigms (the GPU configs' precision).

The fits are in-process ``Trainer.fit`` runs of the tiny preset on the bundled sample: 32-token rows, 2 rows a batch,
a few steps, no logger or checkpoints."""

import math

import lightning as L
import pytest
import torch

from conftest import DATA
from nanollada.data.datamodule import LMDataModule
from nanollada.lm import ARLM, MaskedDiffusionLM
from nanollada.lm.base import lr_factor

SEQ = 32


# ---------------------------------------------------------------------------------------------- LR schedule
@pytest.mark.parametrize("schedule, expected", [
    # warmup 4 steps: (s + 1) / 5; then over total 20 steps with min_lr_ratio 0.1 (wsd: the last 20% = 4 steps decay)
    ("constant", {0: 0.2, 3: 0.8, 4: 1.0, 12: 1.0, 20: 1.0, 30: 1.0}),
    ("cosine", {0: 0.2, 1: 0.4, 3: 0.8, 4: 1.0, 8: 0.1 + 0.45 * (1 + math.sqrt(0.5)), 12: 0.55, 16: 0.1 + 0.45 *
                (1 - math.sqrt(0.5)), 20: 0.1, 30: 0.1}),
    ("wsd", {0: 0.2, 3: 0.8, 4: 1.0, 15: 1.0, 16: 1.0, 17: 0.775, 18: 0.55, 19: 0.325, 20: 0.1, 30: 0.1}),
])
def test_lr_factor_values(schedule, expected):
    got = {s: lr_factor(s, warmup_steps=4, total_steps=20, schedule=schedule, min_lr_ratio=0.1, decay_fraction=0.2)
           for s in expected}
    assert got == pytest.approx(expected, abs=1e-12)


def test_lr_factor_edge_cases():
    assert lr_factor(0, 0, 10, "cosine", 0.1, 0.2) == 1.0  # no warmup: the peak at step 0
    assert lr_factor(5, 2, 2, "cosine", 0.1, 0.2) == 1.0  # nothing left to decay over
    assert lr_factor(9, 0, 10, "wsd", 0.0, 0.5) == pytest.approx(0.2)  # decay from step 5 to 10, linear to 0


# ---------------------------------------------------------------------------------------------- fits
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("opts")
    from nanollada.data.cache import build_cache
    from nanollada.tokenizer import Tokenizer
    build_cache(str(DATA / "pretrain.jsonl"), "pretrain", Tokenizer(), str(d / "cache"), 0.05, log=lambda *_: None)
    return d


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(model, data_dir, steps=3, precision="32-true", val_batches=0):
    torch.manual_seed(0)
    data = LMDataModule([str(DATA / "pretrain.jsonl")], seq_len=SEQ, batch_size=2, val_fraction=0.05,
                        cache_dir=str(data_dir / "cache"))
    rec = LossRecorder()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=val_batches, num_sanity_val_steps=0, val_check_interval=steps,
                        use_distributed_sampler=False, enable_model_summary=False, precision=precision,
                        accelerator="cpu", devices=1, callbacks=[rec])
    trainer.fit(model, data)
    return rec.losses, trainer


def diffusion(seed=0, **kw):
    torch.manual_seed(seed)
    return MaskedDiffusionLM(preset="tiny", max_seq_len=64, warmup_steps=1, schedule="constant", **kw)


def spy_lengths(model):
    """Wrap the model's forward so every training forward records its sequence length."""
    lengths, forward = [], model.forward_model

    def spy(x, *a, **kw):
        lengths.append(x.shape[1])
        return forward(x, *a, **kw)
    object.__setattr__(model, "forward_model", spy)
    return lengths


def test_random_length_prob_cuts_batches(data_dir):
    always, never = diffusion(random_length_prob=1.0), diffusion(random_length_prob=0.0)
    cut, full = spy_lengths(always), spy_lengths(never)
    fit(always, data_dir, steps=4)
    fit(never, data_dir, steps=4)
    assert full == [SEQ] * 4
    # the cut length is a host draw seeded by the step: reproduce it (noise_seed 0, no accumulation)
    want = []
    for step in range(4):
        host = torch.Generator().manual_seed(step)
        assert torch.rand(1, generator=host).item() < 1.0
        want.append(int(torch.randint(1, SEQ + 1, (1,), generator=host)))
    assert cut == want and any(n < SEQ for n in cut), cut


def test_embed_noise_changes_the_loss_only_during_embed_noise_steps(data_dir):
    """lr = 0 keeps the weights fixed, so two runs differ only by the noise: at steps < embed_noise_steps."""
    noisy = diffusion(embed_noise_std=0.5, embed_noise_steps=2, lr=0.0, random_length_prob=0.0)
    plain = diffusion(embed_noise_std=0.0, embed_noise_steps=2, lr=0.0, random_length_prob=0.0)
    a, _ = fit(noisy, data_dir, steps=4)
    b, _ = fit(plain, data_dir, steps=4)
    assert all(abs(x - y) > 1e-4 for x, y in zip(a[:2], b[:2])), (a, b)
    assert a[2:] == b[2:], (a, b)  # same masks, same weights, no noise: bit-identical


def test_compile_true_trains_like_eager(data_dir):
    torch.manual_seed(0)
    eager = ARLM(preset="tiny", max_seq_len=64, warmup_steps=1, schedule="constant")
    torch.manual_seed(0)
    compiled = ARLM(preset="tiny", max_seq_len=64, warmup_steps=1, schedule="constant", compile=True)
    assert type(compiled.forward_model).__name__ == "OptimizedModule"
    a, _ = fit(eager, data_dir, steps=2)
    b, _ = fit(compiled, data_dir, steps=2)
    assert b == pytest.approx(a, rel=1e-4, abs=1e-4)
    assert all(k.startswith("model.") and "_orig_mod" not in k for k in compiled.state_dict())


@pytest.mark.parametrize("paradigm", ["ar", "diffusion"])
def test_bf16_mixed_on_cpu(data_dir, paradigm):
    """A few steps and one validation batch under bf16 autocast: finite, close to the fp32 run, weights stay fp32."""
    def build():
        torch.manual_seed(0)
        if paradigm == "ar":
            return ARLM(preset="tiny", max_seq_len=64, warmup_steps=1, schedule="constant")
        return diffusion(random_length_prob=0.0, val_samples=1)
    fp32, bf16 = build(), build()
    a, _ = fit(fp32, data_dir, steps=2)
    b, trainer = fit(bf16, data_dir, steps=2, precision="bf16-mixed", val_batches=1)
    assert type(trainer.precision_plugin).__name__ == "MixedPrecision"
    assert all(math.isfinite(x) for x in b)
    assert b[0] == pytest.approx(a[0], rel=2e-2)  # same weights and batch at step 0: bf16 rounding only
    assert math.isfinite(float(trainer.callback_metrics["val/nll"]))
    assert all(p.dtype == torch.float32 for p in bf16.parameters())


def test_token_throughput_monitor_counts_rows_and_tokens_and_skips_prediction():
    from nanollada.callbacks import TokenThroughputMonitor, batch_rows, batch_tokens
    batch = {"input_ids": torch.zeros(3, 17, dtype=torch.long)}
    assert (batch_rows(batch), batch_tokens(batch)) == (3, 51)
    cb = TokenThroughputMonitor()
    cb.on_predict_start(None, None)
    cb.on_predict_batch_end(None, None, [], {"index": [0], "prompt": ["x"]}, 0)  # prompts, no tokens: not counted
    with pytest.raises(ValueError, match="window_size"):
        TokenThroughputMonitor(window_size=1)
