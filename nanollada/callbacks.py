"""Lightning callbacks the configs name by class path.

``TokenThroughputMonitor`` is Lightning's ``ThroughputMonitor`` counting the rows and tokens of nanollada batches
(``input_ids`` (B, T) from ``ARCollate`` / ``DiffusionCollate``; padding included). It logs, every
``log_every_n_steps`` batches (rank 0; the rates are rolling averages over ``window_size`` batches):

- ``train/device/items_per_sec``: tokens per second per device (``train/items_per_sec``: all devices, when several);
- ``train/device/samples_per_sec``, ``train/device/batches_per_sec``: rows and batches per second;
- ``train/lengths``, ``train/samples``, ``train/batches``, ``train/time``: running totals;
- ``train/device/flops_per_sec`` and ``train/device/mfu`` where the module sets ``flops_per_batch`` (it does, from
  ``Transformer.flops_per_token``) and, for MFU, Lightning knows the device's peak (CUDA GPUs);
- the same under ``validate/`` during fit; validation time is excluded from the training rates.

On a CUDA device it calls ``torch.cuda.synchronize()`` after every batch on rank 0, so the clock measures finished
work. The configs' progress bar already reads the step loss with ``.item()`` every batch, so with the bar on this
adds no new wait; drop the callback from a YAML to remove it (training is unaffected).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor


def batch_rows(batch: dict) -> int:
    """Rows of a collated batch."""
    return int(batch["input_ids"].shape[0])


def batch_tokens(batch: dict) -> int:
    """Tokens of a collated batch (rows x length, padding included)."""
    return int(batch["input_ids"].numel())


class TokenThroughputMonitor(ThroughputMonitor):
    """``ThroughputMonitor`` over nanollada batches: rows are samples, tokens are items.

    Args:
        window_size: Batches in the rolling average of the rates (>= 2); None: ``trainer.log_every_n_steps``
            (at least 2), so each logged rate covers the batches since roughly the previous log.
    """

    def __init__(self, window_size: int | None = None):
        super().__init__(batch_size_fn=batch_rows, length_fn=batch_tokens)
        if window_size is not None and window_size < 2:
            raise ValueError(f"window_size must be >= 2, got {window_size}")
        self.window_size = window_size

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.kwargs["window_size"] = self.window_size or max(2, trainer.log_every_n_steps)
        super().setup(trainer, pl_module, stage)

    # Prediction batches hold prompts, not token tensors; ``predict`` reports tokens/s with every answer.
    def on_predict_start(self, *args, **kwargs) -> None:
        pass

    def on_predict_batch_end(self, *args, **kwargs) -> None:
        pass

    # predict batches are prompts, not token rows: generation reports its own tokens/s per answer
    def on_predict_start(self, trainer, pl_module) -> None:
        pass

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        pass
