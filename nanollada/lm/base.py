"""What every paradigm's LightningModule shares: the backbone, optimizer, LR schedule, logging and checkpoint payload.

Subclasses (``ARLM``, ``MaskedDiffusionLM``) set ``causal`` and ``collate_cls`` and implement ``training_loss`` and
``eval_sums`` (NLL sum and token count, exact or an ELBO bound); nothing here branches on the paradigm.

Checkpoints carry a ``nanollada`` entry (model config, paradigm, tokenizer bytes) so ``load_checkpoint`` can rebuild
a model for sampling or evaluation without Lightning, using ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torchmetrics import SumMetric

from nanollada.checkpoint import AtomicCheckpointIO
from nanollada.errors import ConfigError
from nanollada.loading import LoadedModel, backbone_state, load_checkpoint, read_checkpoint  # noqa: F401
from nanollada.model import ModelConfig, Transformer, document_attention_mask, load_matching_weights
from nanollada.tokenizer import CHAT_KINDS, Tokenizer


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float,
              decay_fraction: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (linear warmup, then cosine / wsd / constant)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = total_steps - int(decay_fraction * total_steps)  # warmup-stable-decay
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return 1.0 - (1 - min_lr_ratio) * progress


class LanguageModel(L.LightningModule):
    """Base LightningModule: a ``Transformer`` plus AdamW, warmup + cosine/WSD schedule and the loss guard.

    Tokens/s come from ``nanollada.callbacks.TokenThroughputMonitor`` and the LR from ``LearningRateMonitor`` (both
    in every config); the module sets ``flops_per_batch`` for the former's FLOP/s and MFU.

    Args:
        preset: Backbone size: ``tiny`` (~1M, tests), ``small`` (~6M, CPU), ``base`` (~27M, the flagship).
        d_model: Override the preset's width.
        n_layers: Override the preset's depth.
        n_heads: Override the preset's query heads.
        n_kv_heads: Override the preset's key/value heads.
        max_seq_len: Longest sequence the model supports (RoPE table, KV cache, prompt + generation).
        tokenizer: SentencePiece model (file or directory); linked from ``data.tokenizer`` by the CLI.
        lr: Peak learning rate.
        min_lr_ratio: Final LR as a fraction of the peak (cosine floor / end of WSD decay).
        warmup_steps: Linear warmup, in optimizer steps.
        schedule: ``cosine``, ``wsd`` (warmup-stable-decay) or ``constant`` after warmup, over ``trainer.max_steps``.
        decay_fraction: Share of ``max_steps`` spent decaying in the ``wsd`` schedule.
        weight_decay: AdamW decay on matrices (norm weights and embeddings are not decayed).
        betas: AdamW betas.
        document_attention: Confine attention to each packed document (padding is always excluded).
        init_from: Checkpoint to initialise from by weight-matching load (e.g. SFT from pretraining, diffusion from
            AR); tensors whose name and shape match are copied, the rest are reported. Read when a fresh ``fit``
            starts, never when the model is built: ``validate``/``test`` and a ``--ckpt_path`` resume (whose
            weights come from that checkpoint) do not open it, so it may have moved. (FSDP/DeepSpeed shard the
            weights before Lightning restores a checkpoint, so there it is read at setup, before sharding.)
        compile: Wrap the backbone in ``torch.compile``.
        nonfinite_loss: ``error`` stops the run with a clear message when a loss is NaN/inf (checked every
            ``log_every_n_steps`` steps, so the step never waits on the device); ``skip`` checks every step (one
            host sync per step) and skips a non-finite batch (no backward, no weight update; Lightning still counts
            the step), counting them in ``train/skipped_batches``.
    """

    causal: bool = True
    paradigm: str = "base"
    collate_cls = None
    consumes_pairs: bool = False  # trains on preference pairs (data.kind: preference; the DPO modules of lm/dpo.py)
    flops_per_batch: int | None = None  # training FLOPs of the current batch, read by ThroughputMonitor

    def __init__(self, preset: Literal["tiny", "small", "base"] = "base", d_model: int | None = None,
                 n_layers: int | None = None, n_heads: int | None = None, n_kv_heads: int | None = None,
                 max_seq_len: int = 1024, tokenizer: str | None = None, lr: float = 6e-4, min_lr_ratio: float = 0.1,
                 warmup_steps: int = 100, schedule: Literal["cosine", "wsd", "constant"] = "cosine",
                 decay_fraction: float = 0.2, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 document_attention: bool = True, init_from: str | None = None, compile: bool = False,
                 nonfinite_loss: Literal["error", "skip"] = "error"):
        super().__init__()
        self.save_hyperparameters()
        try:
            self.tokenizer = Tokenizer(tokenizer)
        except FileNotFoundError as e:
            raise ConfigError(f"model.tokenizer (linked to data.tokenizer): {e}") from None
        overrides = {k: v for k, v in dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                           n_kv_heads=n_kv_heads).items() if v is not None}
        self.config = ModelConfig.from_preset(preset, vocab_size=self.tokenizer.vocab_size, max_seq_len=max_seq_len,
                                              causal=self.causal, **overrides)
        self.model = Transformer(self.config)
        self.init_report = None  # load_weights_from's report, once a fresh fit has read init_from
        self._restored = False  # weights came from a checkpoint (trainer restore or load_from_checkpoint)
        # Not registered as a submodule (object.__setattr__): the checkpoint holds each weight once, under
        # "model.", whether or not the run was compiled.
        object.__setattr__(self, "forward_model", torch.compile(self.model) if compile else self.model)
        self._nonfinite, self._skipped = None, 0
        # Validation/test sums over this rank's shard of the rows, summed over ranks by torchmetrics at the epoch end
        # (float64: token counts and nats stay exact far beyond float32's 2**24). Metric states are not saved.
        self.eval_nll, self.eval_tokens = SumMetric().set_dtype(torch.float64), SumMetric().set_dtype(torch.float64)

    # ---------------------------------------------------------------- weights
    def load_weights_from(self, path: str, into: torch.nn.Module | None = None,
                          what: str = "init_from") -> dict[str, list[str]]:
        """Weight-matching load of a backbone (``into``, default this model's) from a nanollada checkpoint; prints
        and returns the report (``what`` names the setting in the message). A missing or unreadable file, or one
        trained with another tokenizer (the message names both tokenizer files), raises ``ConfigError``."""
        try:
            payload = read_checkpoint(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"model.{what}: {e}") from None
        theirs = payload["nanollada"]
        if theirs.get("tokenizer_fingerprint") not in (None, self.tokenizer.fingerprint()):
            their_file = theirs.get("tokenizer_path", "a tokenizer file not recorded in the checkpoint")
            raise ConfigError(f"model.{what} {path} was trained with tokenizer {their_file} (fingerprint "
                              f"{theirs['tokenizer_fingerprint']}), not with data.tokenizer {self.tokenizer.path} "
                              f"(fingerprint {self.tokenizer.fingerprint()}); token ids would not match: set "
                              f"data.tokenizer to {their_file}, or start from a checkpoint of {self.tokenizer.path}")
        report = load_matching_weights(self.model if into is None else into, backbone_state(payload["state_dict"]))
        print(f"[nanollada] {what} {path} ({theirs.get('paradigm')}): {len(report['matched'])} tensors matched, "
              f"missing {report['missing']}, unexpected {report['unexpected']}, "
              f"shape mismatch {report['shape_mismatch']}")
        return report

    def _load_init_from(self) -> None:
        """Copy ``init_from``'s matching tensors into the backbone in place (the optimizer's parameter references
        stay valid), unless the weights were restored from a checkpoint: then the file is not opened at all."""
        if self._restored or self.trainer.ckpt_path:
            print(f"[nanollada] init_from {self.hparams.init_from} not read: weights restored from "
                  f"{self.trainer.ckpt_path or 'a checkpoint'}")
            return
        self.init_report = self.load_weights_from(self.hparams.init_from)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored = True

    def paradigm_config(self) -> dict:
        """What inference needs beyond the backbone (e.g. block diffusion's block size), saved in checkpoints and
        handed to the paradigm's ``nanollada.paradigms`` class."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nanollada"] = {
            "paradigm": self.paradigm, "model_config": self.config.to_dict(),
            "paradigm_config": self.paradigm_config(),
            "tokenizer_fingerprint": self.tokenizer.fingerprint(),
            "tokenizer_path": str(self.tokenizer.path),  # named by the init_from tokenizer check
            "data_kind": getattr(getattr(self.trainer, "datamodule", None), "kind", "pretrain"),
            "tokenizer_model": torch.frombuffer(bytearray(self.tokenizer.model_bytes), dtype=torch.uint8),
        }

    # ---------------------------------------------------------------- shared pieces
    def attention_mask(self, batch: dict) -> torch.Tensor | None:
        """(B, 1, T, T) bool document/padding mask, or None when no row needs one (the fast SDPA path).

        The collate function decides on the host whether any row holds several documents or padding
        (``needs_doc_mask`` / ``needs_pad_mask``), so the step never waits on the device to decide.
        """
        doc_ids = batch["doc_ids"]
        if self.hparams.document_attention:
            return document_attention_mask(doc_ids, causal=False) if batch.get("needs_doc_mask", True) else None
        if not batch.get("needs_pad_mask", True):
            return None
        return document_attention_mask(-(doc_ids < 0).long(), causal=False)  # real tokens 0, padding -1

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr,
                                betas=tuple(self.hparams.betas), fused=fused)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 0
        if total <= 0 and self.hparams.schedule != "constant":
            raise ConfigError(f"set trainer.max_steps (> 0): model.schedule {self.hparams.schedule} is defined over "
                              "optimizer steps")
        h = self.hparams
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
            s, h.warmup_steps, total, h.schedule, h.min_lr_ratio, h.decay_fraction))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def training_loss(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The paradigm's training loss for one batch (a scalar tensor)."""
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """``train/loss`` is rank 0's batch loss under DDP (no per-step all-reduce)."""
        B, T = batch["input_ids"].shape
        self.flops_per_batch = int(self.model.flops_per_token(T) * B * T)
        loss = self.training_loss(batch, batch_idx)
        bad = ~torch.isfinite(loss.detach())
        if self.hparams.nonfinite_loss == "skip":
            if bool(bad):  # host sync, only in skip mode
                self._skipped += 1
                self.log("train/skipped_batches", float(self._skipped), on_step=True)
                return None  # Lightning skips backward and the optimizer step
        else:
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        return loss

    def _check_finite(self) -> None:
        if self._nonfinite is not None and bool(self._nonfinite):
            raise RuntimeError(
                f"non-finite training loss (NaN/inf) at or before step {self.global_step}: lower model.lr, check "
                "the data, or set model.nonfinite_loss: skip to skip such batches")
        self._nonfinite = None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self._check_finite()

    # ---------------------------------------------------------------- validation / test on one scale
    def eval_sums(self, batch: dict, batch_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL sum in nats, token count) for a batch: exact for AR, an ELBO bound for diffusion."""
        raise NotImplementedError

    def eval_generators(self, batch: dict, batch_idx: int, seed: int):
        """The generators of a Monte-Carlo evaluation batch: one per row seeded by (``seed``, the row's global index)
        when the batch carries ``row_index`` (the validation/test loaders add it), so the estimate does not depend on
        the batch size, the batching or the number of ranks; else one for the batch, seeded by ``batch_idx``."""
        from nanollada.evaluation.likelihood import RowGenerators
        if "row_index" not in batch:
            return torch.Generator(device=self.device).manual_seed(seed + batch_idx)
        return RowGenerators([torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + int(r))
                              for r in batch["row_index"].tolist()], width=self.config.max_seq_len)

    def on_train_end(self) -> None:
        self._check_finite()

    def on_validation_epoch_start(self) -> None:
        self.flops_per_batch = None  # no FLOP count for evaluation batches (training steps set it again)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        for m in (self.eval_nll, self.eval_tokens):
            m.reset()
            m.update(zero)  # a rank whose shard is empty still takes part in the sum

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        nll, n = self.eval_sums(batch, batch_idx)
        self.eval_nll.update(nll.double())
        self.eval_tokens.update(n.double())

    def _log_eval(self, prefix: str) -> None:
        nll, n = self.eval_nll.compute(), self.eval_tokens.compute()  # summed over every rank's shard
        per_token = (nll / n.clamp(min=1)).float()
        self.log_dict({f"{prefix}/loss": per_token, f"{prefix}/nll": per_token, f"{prefix}/ppl": per_token.exp(),
                       f"{prefix}/tokens": n.float()}, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # ---------------------------------------------------------------- predict (LightningCLI)
    generation = None  # a GenerationSettings; ``nanollada predict`` sets it from its --generation.* flags

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Sample an answer for every prompt of the batch with ``self.generation``, through the paradigm interface:
        a list of ``generate.generate_text`` records, each with its prompt's ``index`` in the input file."""
        from nanollada.generate import GenerationSettings, generate_text
        from nanollada.paradigms import paradigm_class
        data = getattr(self.trainer, "datamodule", None)
        iface = paradigm_class(self.paradigm)(self.model, self.tokenizer,
                                              is_chat=getattr(data, "kind", "pretrain") in CHAT_KINDS,
                                              config=self.paradigm_config())
        settings = self.generation or GenerationSettings()
        return [{"index": int(i), **generate_text(iface, p, settings)} for i, p in zip(batch["index"], batch["prompt"])]

    def setup(self, stage: str) -> None:
        """Make plain torch checkpoint writes atomic (strategies with their own IO, e.g. FSDP, are left alone)."""
        if stage == "fit" and self.hparams.nonfinite_loss == "skip" and self.trainer.world_size > 1:
            # Lightning documents returning None from training_step as unsupported with several devices: one rank
            # skipping its backward leaves the others waiting in the gradient all-reduce.
            raise ConfigError(f"model.nonfinite_loss: skip is not supported with several devices (world_size="
                             f"{self.trainer.world_size}): a skipped batch on one rank would hang the others; use "
                             "nonfinite_loss: error")
        io = getattr(self.trainer.strategy, "checkpoint_io", None)
        if type(io) is TorchCheckpointIO:
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit" and self.hparams.init_from and self.trainer.strategy.restore_checkpoint_after_setup:
            self._load_init_from()  # FSDP / DeepSpeed: before the weights are sharded (a resume overwrites them)

    def on_fit_start(self) -> None:
        print(f"[nanollada] {type(self).__name__}: {self.model.num_params() / 1e6:.2f}M parameters "
              f"({self.hparams.preset}, d={self.config.d_model}, layers={self.config.n_layers}, "
              f"heads={self.config.n_heads}/{self.config.n_kv_heads} kv, vocab={self.config.vocab_size})")
        data = getattr(self.trainer, "datamodule", None)
        tok = getattr(data, "tokenizer", None)
        if tok is not None and tok.fingerprint() != self.tokenizer.fingerprint():
            raise ConfigError(f"data tokenizer {tok.path} differs from the model's {self.tokenizer.path}; "
                             "set data.tokenizer (linked to model.tokenizer) to one file")
        pairs = getattr(data, "kind", "pretrain") == "preference"
        if data is not None and pairs != self.consumes_pairs:
            raise ConfigError(f"{type(self).__name__} " + ("trains on preference pairs: set data.kind: preference" if
                             self.consumes_pairs else "does not train on preference pairs (data.kind: preference "
                             "is for the DPO modules, e.g. nanollada.lm.ARDPO)"))
        # After Lightning restored a --ckpt_path (trainer.ckpt_path is known only from then on) and after the
        # optimizer was built: the weights are copied into the tensors it holds.
        if self.hparams.init_from and not self.trainer.strategy.restore_checkpoint_after_setup:
            self._load_init_from()
