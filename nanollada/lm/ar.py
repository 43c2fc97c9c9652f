"""``ARLM``: the autoregressive paradigm. Causal backbone, next-token cross-entropy on the loss mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanollada.data.collate import IGNORE_INDEX, ARCollate
from nanollada.lm.base import LanguageModel


class ARLM(LanguageModel):
    """Causal language model (MiniMind-style). Batches come from ``ARCollate``.

    Logs ``train/loss``, ``val/loss``, ``val/nll`` (nats per target token) and ``val/ppl`` (exp of val/nll, exact).
    Init arguments: see ``LanguageModel``.
    """

    causal = True
    paradigm = "ar"
    collate_cls = ARCollate

    def eval_sums(self, batch: dict, batch_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of target-token NLL, number of target tokens): exact. Logits (B, T, V)."""
        logits = self.forward_model(batch["input_ids"], attn_mask=self.attention_mask(batch))
        nll = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX,
                              reduction="sum")
        return nll, (batch["targets"] != IGNORE_INDEX).sum()

    def training_loss(self, batch: dict, batch_idx: int) -> torch.Tensor:
        nll, n = self.eval_sums(batch)
        return nll / n.clamp(min=1)
