"""A NaN/inf training loss stops the run with a clear message, or skips the batch when configured."""

import lightning as L
import pytest
import torch

from conftest import DATA
from nanollada.data.datamodule import LMDataModule
from nanollada.lm.ar import ARLM


class PoisonedARLM(ARLM):
    """An ARLM whose loss turns NaN on batches 3 and 4."""

    def training_loss(self, batch, batch_idx):
        loss = super().training_loss(batch, batch_idx)
        self.batches_seen = batch_idx + 1
        return loss * float("nan") if batch_idx in (3, 4) else loss


def fit(tmp_path, mode, steps=8):
    model = PoisonedARLM(preset="tiny", max_seq_len=64, warmup_steps=1, schedule="constant", nonfinite_loss=mode)
    data = LMDataModule([str(DATA / "pretrain.jsonl")], seq_len=32, batch_size=2, val_fraction=0.05,
                        cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, log_every_n_steps=2, use_distributed_sampler=False,
                        enable_model_summary=False)
    trainer.fit(model, data)
    return model, trainer


def test_nonfinite_loss_stops_the_run_with_a_clear_message(tmp_path):
    with pytest.raises(RuntimeError, match="non-finite training loss"):
        fit(tmp_path, "error")


def test_nonfinite_loss_skips_the_batch_when_configured(tmp_path):
    model, trainer = fit(tmp_path, "skip")
    assert model._skipped == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN batches never reached the weights
    # Lightning still counts a skipped batch as a step (its optimizer call sees no gradients), so the data
    # position, which is derived from the step, stays exact on resume.
    assert model.batches_seen == trainer.global_step == 8
