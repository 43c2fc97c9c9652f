"""``BlockDiffusionLM``: LLaDA 2.0's block diffusion (BDLM, after BD3-LM). Bidirectional inside a block, causal
across blocks, trained on ``x_t ⊕ x_0``.

A training row of L tokens is fed twice: the noisy copy x_t (masked with the row's -- or each block's -- masking
probability) and the clean copy x_0, both with RoPE positions 0..L-1. The attention mask
(``model.block_diffusion_mask``) lets a noisy block see itself and the clean earlier blocks, the clean half be
block-causal, and never lets x_0 see x_t; every mask is intersected with the packed documents and padding. The loss
is taken on the noisy half only, with the ELBO weight 1/p_mask of the linear schedule and the LLaDA normalisation by
the row's eligible count (eq. 3 in pretraining, eq. 5 in SFT), so ``val/nll`` -- the Monte-Carlo negative ELBO of
``evaluation.block_likelihood`` -- is an upper bound comparable with AR's exact NLL and masked diffusion's bound on
the same validation tokens. Block size L is exactly masked diffusion (same draws, same loss); block size 1 is
next-token prediction from a mask token.

AR -> BDLM conversion (LLaDA 2.0 §4.1) is a warmup-stable-decay schedule over the block size,
:class:`BlockSizeSchedule`, a pure function of the optimizer step (so resume restores it exactly), logged as
``train/block_size``. SFT (LLaDA 2.0 §5): every row's effective length is its answer and first eos rounded up to
whole blocks with eos (``round_rows_to_blocks``; the eos beyond are unattended padding); options: a mask-ratio band
(``mask_ratio: ClippedBand``), complementary masking, and the confidence-aware CAP loss. Decoding:
``sampling.block_diffusion`` (threshold decoding with an exact cache of finished blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanollada.data.collate import DiffusionCollate
from nanollada.errors import ConfigError
from nanollada.evaluation.block_likelihood import block_diffusion_elbo, block_diffusion_logits
from nanollada.lm.base import LanguageModel
from nanollada.noise import IIDTime, MaskRatioSampler, drop_prompts, mask_probability


class BlockSizeSchedule:
    """Warmup-stable-decay schedule of the block size over optimizer steps (LLaDA 2.0's AR -> BDLM conversion).

    Warmup walks through ``warmup_sizes`` (equal slices of ``warmup_steps``; the AR model counts as block size 1),
    the stable phase uses the full row length L (``stable_steps``: plain masked diffusion), and decay walks through
    ``decay_sizes`` (equal slices of ``decay_steps``), whose last entry is kept afterwards. Without decay sizes the
    block size stays L after the stable phase. Every size must divide ``data.seq_len`` (checked when training starts).

    Args:
        warmup_sizes: Block sizes of the warmup phase, e.g. [1, 4, 32, 64].
        warmup_steps: Optimizer steps of the warmup phase.
        stable_steps: Optimizer steps at block size L.
        decay_sizes: Block sizes of the decay phase, e.g. [128, 64, 32]; the last one is the final block size.
        decay_steps: Optimizer steps of the decay phase.
    """

    def __init__(self, warmup_sizes: list[int] | None = None, warmup_steps: int = 0, stable_steps: int = 0,
                 decay_sizes: list[int] | None = None, decay_steps: int = 0):
        self.warmup_sizes, self.decay_sizes = list(warmup_sizes or []), list(decay_sizes or [])
        self.warmup_steps, self.stable_steps, self.decay_steps = warmup_steps, stable_steps, decay_steps
        if min(warmup_steps, stable_steps, decay_steps) < 0:
            raise ConfigError("BlockSizeSchedule step counts must be >= 0")
        if any(b < 1 for b in self.warmup_sizes + self.decay_sizes):
            raise ConfigError(f"block sizes must be >= 1, got {self.warmup_sizes + self.decay_sizes}")
        if (warmup_steps > 0) != bool(self.warmup_sizes) or (decay_steps > 0) != bool(self.decay_sizes):
            raise ConfigError("give warmup_sizes with warmup_steps > 0 (and decay_sizes with decay_steps > 0)")

    @staticmethod
    def _slice(sizes: list[int], step: int, steps: int) -> int:
        return sizes[min(len(sizes) - 1, step * len(sizes) // steps)]

    def __call__(self, step: int, seq_len: int) -> int:
        """The block size at optimizer step ``step`` for rows of ``seq_len`` tokens."""
        if step < self.warmup_steps:
            return self._slice(self.warmup_sizes, step, self.warmup_steps)
        step -= self.warmup_steps
        if step < self.stable_steps or not self.decay_sizes:
            return seq_len
        step -= self.stable_steps
        if step < self.decay_steps:
            return self._slice(self.decay_sizes, step, self.decay_steps)
        return self.decay_sizes[-1]

    def sizes(self) -> list[int]:
        return self.warmup_sizes + self.decay_sizes


def block_diffusion_loss(logits: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor, eligible: torch.Tensor,
                         p_mask: torch.Tensor) -> torch.Tensor:
    """Per-row sum over masked positions of CE / p_mask, divided by the row's eligible count, mean over rows with
    eligible tokens: logits (B, L, V), ids/masked/eligible (B, L), p_mask (B, L) (per row or per block)."""
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
    per_row = (ce * masked / p_mask).sum(1) / eligible.sum(1).clamp(min=1)
    has_loss = eligible.any(1)
    return (per_row * has_loss).sum() / has_loss.sum().clamp(min=1)


def round_rows_to_blocks(ids: torch.Tensor, eligible: torch.Tensor, doc_ids: torch.Tensor, block_size: int,
                         eos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaDA 2.0's effective length (§5): each SFT row ends at a block boundary, with eos.

    The batch is right-padded with eos to a multiple of ``block_size`` (each new column eligible and in a document
    as the row's last one), then row r keeps its eos padding eligible up to ceil(n_r / B) * B, where n_r counts the
    row up to and including the first eos of its trailing run of eligible eos (the collate puts at least one after
    every untruncated answer); the eos beyond that are padding: not eligible and document -1, never attended (as
    ``pad_to_blocks``). A row without that trailing run (pretraining rows never hold two eos in a row; a truncated
    answer) is only padded. (B, T) tensors in, (B, T') out, T' the multiple of ``block_size`` at or above T."""
    B, T = ids.shape
    extra = -T % block_size
    if extra:
        ids = torch.cat([ids, ids.new_full((B, extra), eos_id)], 1)
        eligible = torch.cat([eligible, eligible[:, -1:].expand(B, extra)], 1)
        doc_ids = torch.cat([doc_ids, doc_ids[:, -1:].expand(B, extra)], 1)
    pad = eligible & (ids == eos_id)
    trailing = pad.flip(1).long().cumprod(1).flip(1).bool()  # the run of eligible eos that ends the row
    first = ids.shape[1] - trailing.sum(1)  # its first position (the row's length when there is none)
    keep = -(-(first + 1) // block_size) * block_size  # ceil(n / B) * B, n = the row and its first eos
    beyond = trailing & (torch.arange(ids.shape[1], device=ids.device)[None] >= keep[:, None])
    return ids, eligible & ~beyond, doc_ids.masked_fill(beyond, -1)


def cap_entropy(logits: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """LLaDA 2.0's confidence-aware loss (CAP, eq. 6): mean entropy of the predictive distribution over the masked
    positions whose argmax is already correct (the correctness mask carries no gradient); 0 when there are none."""
    with torch.no_grad():
        right = masked & (logits.argmax(-1) == ids)
    logp = F.log_softmax(logits.float(), -1)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, L)
    return (entropy * right).sum() / right.sum().clamp(min=1)


class BlockDiffusionLM(LanguageModel):
    """Block diffusion language model (LLaDA 2.0 BDLM). Batches come from ``DiffusionCollate``.

    Args:
        block_size: Block size B for training, validation and (by default) decoding; ``data.seq_len`` must be a
            multiple of it. Ignored during training while ``block_schedule`` is set (validation still uses it).
        block_schedule: Optional warmup-stable-decay schedule over the block size (AR -> BDLM conversion).
        mask_ratio: Sampler of the masking time t: ``IIDTime`` (default), ``StratifiedTime``, ``ClippedBand``
            (LLaDA 2.0 SFT: [0.3, 0.8]) or ``WSDMaskRatio``.
        per_block_time: Draw one masking time per block instead of per row (BD3-LM; the sampler is called with
            batch x blocks draws, so ``StratifiedTime`` gives its antithetic per-block t).
        complementary_masking: Also train on the complementary mask of every row in the same batch (the eligible
            positions the first view left visible, masking probability 1 - p_mask; LLaDA 2.0 §5.1).
        cap_lambda: Weight of the CAP entropy loss (0 = off; dFactory's docs suggest 2.0, Nano-LLaDA uses 0.1).
        val_samples: Monte-Carlo samples (stratified t) per validation row for the ELBO.
        val_seed: Seed of the validation masks.
        embed_noise_std: Std of Gaussian noise on the embeddings of masked positions early in training (LLaDA 2.0
            §7.1, for AR initialisation); 0 = off.
        embed_noise_steps: Optimizer steps with that noise.
        noise_seed: Seed of the training masks (a function of step, micro-batch and rank: resume is exact).
        edit_rate: LLaDA 2.1 editing objective (our design; the report does not publish rates): the share of the
            visible (unmasked, eligible) tokens of x_t replaced by a random ordinary token (special ids excluded);
            the model then learns to recover the original at every visible eligible position (T2T: the corrupted
            ones carry the signal, the clean ones teach it to keep correct tokens) besides the masked ones (M2T).
            0 = off (LLaDA 2.0).
        edit_warmup_steps: Optimizer steps over which the corruption rate rises linearly from 0 to ``edit_rate``.
        t2t_weight: Weight of the T2T loss (per row: sum of CE over visible eligible positions / eligible count).
        self_corrupt: Corrupt with the model's own predictions instead of uniform noise (the report's "multi-turn
            forward"): one extra no-grad forward predicts the chosen positions as if masked and those predictions
            replace them, so the model learns to repair its own kind of mistakes.
        prompt_dropout: SFT: probability that a row's prompt is replaced by mask tokens (never a loss target), so
            the model also learns the unconditional distribution that classifier-free guidance (``cfg_scale``)
            needs. 0 = off (default).
        **kwargs: Backbone, optimizer and schedule arguments of ``LanguageModel``.
    """

    causal = False
    paradigm = "block_diffusion"
    collate_cls = DiffusionCollate

    def __init__(self, block_size: int = 32, block_schedule: BlockSizeSchedule | None = None,
                 mask_ratio: MaskRatioSampler | None = None, per_block_time: bool = False,
                 complementary_masking: bool = False, cap_lambda: float = 0.0, val_samples: int = 4,
                 val_seed: int = 1234, embed_noise_std: float = 0.0, embed_noise_steps: int = 0, noise_seed: int = 0,
                 edit_rate: float = 0.0, edit_warmup_steps: int = 0, t2t_weight: float = 1.0,
                 self_corrupt: bool = False, prompt_dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        if cap_lambda < 0:
            raise ConfigError(f"cap_lambda must be >= 0, got {cap_lambda}")
        if val_samples < 1:
            raise ConfigError(f"val_samples must be >= 1, got {val_samples}")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ConfigError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        if not 0.0 <= edit_rate < 1.0 or t2t_weight < 0 or edit_warmup_steps < 0:
            raise ConfigError(f"need 0 <= edit_rate < 1, t2t_weight >= 0, edit_warmup_steps >= 0; got {edit_rate}, "
                             f"{t2t_weight}, {edit_warmup_steps}")
        special = set(self.tokenizer.special_ids)
        self.register_buffer("ordinary_ids", torch.tensor([i for i in range(self.tokenizer.vocab_size)
                                                           if i not in special]), persistent=False)
        self.block_schedule = block_schedule
        self.mask_ratio = mask_ratio if mask_ratio is not None else IIDTime()
        self.mask_id = self.tokenizer.mask_id

    def paradigm_config(self) -> dict:
        return {"block_size": self.hparams.block_size, "editing_trained": self.hparams.edit_rate > 0}

    def corrupt(self, noisy, ids, masked, eligible, docs, block, g) -> tuple[torch.Tensor, torch.Tensor]:
        """The editing objective's input: replace a share of the visible eligible tokens (uniform random ordinary
        tokens, or the model's own predictions with ``self_corrupt``). Returns (noisy ids, T2T positions)."""
        h, step = self.hparams, self.global_step
        rate = h.edit_rate * min(1.0, (step + 1) / h.edit_warmup_steps) if h.edit_warmup_steps else h.edit_rate
        visible = eligible & ~masked
        chosen = (torch.rand(ids.shape, generator=g, device=g.device).to(ids.device) < rate) & visible
        if h.self_corrupt:
            with torch.no_grad():
                probe = torch.where(chosen, torch.full_like(ids, self.mask_id), noisy)
                logits = block_diffusion_logits(self.forward_model, probe, ids, docs, block).float()
                logits[..., list(self.tokenizer.special_ids)] = -torch.inf
                repl = logits.argmax(-1)
        else:
            pick = torch.randint(0, len(self.ordinary_ids), ids.shape, generator=g, device=g.device).to(ids.device)
            repl = self.ordinary_ids[pick]
        self.log("train/corrupted", chosen.sum() / eligible.sum().clamp(min=1), on_step=True)
        return torch.where(chosen, repl, noisy), visible

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        data = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(data, "seq_len", None)
        if seq_len is not None and getattr(data, "kind", "pretrain") == "pretrain":
            sizes = [self.hparams.block_size] + (self.block_schedule.sizes() if self.block_schedule else [])
            for b in sizes:
                if seq_len % b:
                    raise ConfigError(f"data.seq_len={seq_len} is not a multiple of the block size {b} "
                                     f"(model.block_size / model.block_schedule): every block must be whole")

    def current_block_size(self, seq_len: int) -> int:
        """The training block size at this step (the schedule's, or ``block_size``), capped at the row length."""
        b = self.block_schedule(self.global_step, seq_len) if self.block_schedule else self.hparams.block_size
        return min(b, seq_len)

    def noise(self, ids: torch.Tensor, eligible: torch.Tensor, block: int, g: torch.Generator):
        """Masks of one view: (noisy ids, masked bool, p_mask (B, L)). One t per row, or per block."""
        B, L = ids.shape
        if self.hparams.per_block_time:
            t = self.mask_ratio(B * (L // block), self.global_step, g, self.device).view(B, L // block)
            p_mask = mask_probability(t).repeat_interleave(block, dim=1)
        else:
            p_mask = mask_probability(self.mask_ratio(B, self.global_step, g, self.device))[:, None].expand(B, L)
        u = torch.rand(ids.shape, generator=g, device=g.device).to(ids.device)
        masked = (u < p_mask) & eligible
        return torch.where(masked, torch.full_like(ids, self.mask_id), ids), masked, p_mask

    def training_loss(self, batch: dict, batch_idx: int) -> torch.Tensor:
        h, step = self.hparams, self.global_step
        accum, world = self.trainer.accumulate_grad_batches, max(1, self.trainer.world_size)
        g = self._generator(((h.noise_seed * 1_000_003 + step) * accum + batch_idx % accum) * world
                            + self.global_rank)
        ids, eligible, docs = batch["input_ids"], batch["eligible"], self._doc_ids(batch)
        block = self.current_block_size(ids.shape[1])
        ids, eligible, docs = round_rows_to_blocks(ids, eligible, docs, block, self.tokenizer.eos_id)
        noisy, masked, p_mask = self.noise(ids, eligible, block, g)
        noisy = drop_prompts(noisy, eligible, docs >= 0, h.prompt_dropout, self.mask_id, g)  # for cfg_scale
        t2t = None
        if h.edit_rate > 0:
            noisy, t2t = self.corrupt(noisy, ids, masked, eligible, docs, block, g)
        if h.complementary_masking:
            comp = eligible & ~masked
            noisy = torch.cat([noisy, torch.where(comp, torch.full_like(ids, self.mask_id), ids)])
            masked, p_mask = torch.cat([masked, comp]), torch.cat([p_mask, (1 - p_mask).clamp(min=1e-3)])
            ids, eligible, docs = ids.repeat(2, 1), eligible.repeat(2, 1), docs.repeat(2, 1)
            t2t = None if t2t is None else torch.cat([t2t, torch.zeros_like(t2t)])
        embeds = None
        if h.embed_noise_std > 0 and step < h.embed_noise_steps:
            embeds = self.model.embed(torch.cat([noisy, ids], 1))
            noise = torch.randn(embeds.shape, generator=g, device=self.device, dtype=embeds.dtype)
            embeds = embeds + h.embed_noise_std * noise * torch.cat([masked, torch.zeros_like(masked)], 1)[..., None]
        logits = block_diffusion_logits(self.forward_model, noisy, ids, docs, block, inputs_embeds=embeds)
        loss = block_diffusion_loss(logits, ids, masked, eligible, p_mask)
        if t2t is not None:
            ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
            t2t_loss = ((ce * t2t).sum(1) / eligible.sum(1).clamp(min=1)).mean()
            self.log("train/t2t_loss", t2t_loss, on_step=True)
            loss = loss + h.t2t_weight * t2t_loss
        if h.cap_lambda > 0:
            cap = cap_entropy(logits, ids, masked)
            self.log("train/cap_entropy", cap, on_step=True)
            loss = loss + h.cap_lambda * cap
        B, L = ids.shape
        self.flops_per_batch = int(self.model.flops_per_token(2 * L) * B * 2 * L)  # the 2L input
        self.log("train/block_size", float(block), on_step=True)
        self.log("train/mask_ratio", masked.sum() / eligible.sum().clamp(min=1), on_step=True)
        return loss

    def _doc_ids(self, batch: dict) -> torch.Tensor:
        """Document ids for the block mask: the packed documents (or one document per row) with padding -1."""
        docs = batch["doc_ids"]
        if self.hparams.document_attention:
            return docs
        return torch.where(docs < 0, -1, 0)

    def eval_sums(self, batch: dict, batch_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(Monte-Carlo negative block-ELBO sum in nats, eligible token count) at ``block_size``: rows cut to their
        effective length as in training (``round_rows_to_blocks``), masks fixed per row by ``val_seed``."""
        g = self.eval_generators(batch, batch_idx, self.hparams.val_seed)
        ids, eligible, docs = round_rows_to_blocks(batch["input_ids"], batch["eligible"], self._doc_ids(batch),
                                                   min(self.hparams.block_size, batch["input_ids"].shape[1]),
                                                   self.tokenizer.eos_id)
        block = min(self.hparams.block_size, ids.shape[1])
        nll = block_diffusion_elbo(self.forward_model, ids, eligible, docs, self.mask_id, block,
                                   num_samples=self.hparams.val_samples, generator=g)
        return nll.sum(), eligible.sum()
