"""``MaskedDiffusionLM``: the LLaDA paradigm. Bidirectional backbone trained to recover randomly masked tokens.

Training (LLaDA eq. 3 / eq. 5, Nie et al. 2025): per row draw a masking time t (a ``MaskRatioSampler``), mask each
eligible token with probability ``p_mask = (1 - eps) t + eps``, and take

    loss_row = sum_{masked i} CE(x_i | x_t) / p_mask  /  n_eligible_row,     loss = mean over rows.

In pretraining every token is eligible, so this is eq. 3's ``1/(B L)`` normalisation; in SFT only the response and
its eos padding are eligible, so it is eq. 5's per-answer-length normalisation -- one formula, no flag. A row in
which no token was drawn for masking contributes 0 (LLaDA divides by the batch size all the same), so the loss is
an unbiased estimate of the eq. 3 / eq. 5 objective.

``eos_pad_weight`` (default 1 = LLaDA) is an optional deviation for SFT: it down-weights the eos padding beyond
an answer's first eos, both in the sum and in the answer length it is divided by.

Validation reports a Monte-Carlo estimate of the negative ELBO (an upper bound on the NLL) with fixed seeds and
stratified t as ``val/nll`` and ``val/ppl``, on the same rows and scale as the AR model's exact values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanollada.data.collate import DiffusionCollate
from nanollada.errors import ConfigError
from nanollada.evaluation.likelihood import diffusion_elbo
from nanollada.lm.base import LanguageModel
from nanollada.noise import IIDTime, MaskRatioSampler, apply_random_mask, drop_prompts, mask_probability


def masked_diffusion_loss(logits: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor, eligible: torch.Tensor,
                          p_mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """LLaDA eq. 3 / eq. 5 loss: logits (B, T, V), clean ids (B, T), masked/eligible bool (B, T), p_mask (B,).

    Per row: sum over masked positions of CE / p_mask, divided by the row's eligible count; then the mean over rows
    that have eligible tokens. Optional ``weights`` (B, T) float weigh each position in the sum and in the count
    (``eos_padding_weights``; None = all 1, LLaDA). Computed densely (no boolean indexing), so it never syncs with
    the device.
    """
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
    if weights is None:
        per_row = (ce * masked / p_mask[:, None]).sum(1) / eligible.sum(1).clamp(min=1)
    else:  # a row with eligible tokens weighs >= 1 (its first eligible token has weight 1)
        per_row = (ce * masked * weights / p_mask[:, None]).sum(1) / (eligible * weights).sum(1).clamp(min=1)
    has_loss = eligible.any(1)
    return (per_row * has_loss).sum() / has_loss.sum().clamp(min=1)


def eos_padding_weights(ids: torch.Tensor, eligible: torch.Tensor, eos_id: int, weight: float) -> torch.Tensor:
    """(B, T) float: ``weight`` on every eligible eos that follows an eligible eos (the SFT padding beyond an
    answer's first eos), 1 elsewhere. Pretraining rows never hold two eos in a row, so they are unaffected."""
    eos = eligible & (ids == eos_id)
    beyond = torch.zeros_like(eos)
    beyond[:, 1:] = eos[:, 1:] & eos[:, :-1]
    return torch.where(beyond, weight, 1.0).to(torch.float32)


class MaskedDiffusionLM(LanguageModel):
    """LLaDA-style masked diffusion language model. Batches come from ``DiffusionCollate``.

    Args:
        mask_ratio: Sampler of the masking time t per row: ``IIDTime`` (LLaDA), ``StratifiedTime`` (MDLM),
            ``ClippedBand`` (BD3-LM / LLaDA 2.0 SFT) or ``WSDMaskRatio`` (v0.1.0 report). Default ``IIDTime``.
        random_length_prob: Probability that a batch is cut to a random length in [1, T] (LLaDA uses 0.01 in
            pretraining so the model also sees short sequences).
        val_samples: Monte-Carlo samples (stratified t) per validation row for the ELBO.
        val_seed: Seed of the validation masks: every validation pass scores the same masks.
        embed_noise_std: Std of Gaussian noise added to the embeddings of masked positions early in training
            (LLaDA 2.0: an untrained mask embedding after AR initialisation can blow up gradients); 0 = off.
        embed_noise_steps: Number of optimizer steps during which that noise is added.
        noise_seed: Seed of the training masks; each step's masks depend only on (noise_seed, step, rank),
            so a resumed run draws exactly the masks an uninterrupted one would.
        eos_pad_weight: Training weight, in [0, 1], of the SFT eos padding beyond an answer's first eos (in the
            loss sum and in the answer length it is divided by). 1.0 (default) is LLaDA: all padding counts as
            answer, so the model learns to fill the rest of the canvas with eos (on the bundled SFT sample 64% of
            the eligible tokens are such padding, which pushes the sampler towards committing eos early). Below 1
            is a deviation from LLaDA: the first eos (where to stop) keeps full weight, the rest counts less
            (0 = not learnt). Validation (``val/nll``) stays the unweighted ELBO.
        prompt_dropout: SFT: probability that a row's prompt is replaced by mask tokens (never a loss target), so
            the model also learns the unconditional distribution that classifier-free guidance (``cfg_scale``)
            needs. 0 = off (default).
        **kwargs: Backbone, optimizer and schedule arguments of ``LanguageModel``.
    """

    causal = False
    paradigm = "diffusion"
    collate_cls = DiffusionCollate

    def __init__(self, mask_ratio: MaskRatioSampler | None = None, random_length_prob: float = 0.01,
                 val_samples: int = 4, val_seed: int = 1234, embed_noise_std: float = 0.0,
                 embed_noise_steps: int = 0, noise_seed: int = 0, eos_pad_weight: float = 1.0,
                 prompt_dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= random_length_prob <= 1.0:
            raise ConfigError(f"random_length_prob must be in [0, 1], got {random_length_prob}")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ConfigError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        if not 0.0 <= eos_pad_weight <= 1.0:
            raise ConfigError(f"eos_pad_weight must be in [0, 1], got {eos_pad_weight}")
        if val_samples < 1:
            raise ConfigError(f"val_samples must be >= 1, got {val_samples}")
        self.mask_ratio = mask_ratio if mask_ratio is not None else IIDTime()
        self.mask_id = self.tokenizer.mask_id

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_loss(self, batch: dict, batch_idx: int) -> torch.Tensor:
        h, step = self.hparams, self.global_step
        # One seed per (step, micro-batch, rank): gradient-accumulation micro-batches draw different masks, and a
        # resumed run (which restarts at an optimizer-step boundary) draws exactly the masks of an uninterrupted one.
        accum, world = self.trainer.accumulate_grad_batches, max(1, self.trainer.world_size)
        micro = batch_idx % accum
        g = self._generator(((h.noise_seed * 1_000_003 + step) * accum + micro) * world + self.global_rank)
        host = torch.Generator().manual_seed((h.noise_seed * 7919 + step) * accum + micro)  # host draws: no sync
        ids, eligible, attn_mask = batch["input_ids"], batch["eligible"], self.attention_mask(batch)
        if h.random_length_prob > 0 and torch.rand(1, generator=host).item() < h.random_length_prob:
            T = int(torch.randint(1, ids.shape[1] + 1, (1,), generator=host))
            ids, eligible = ids[:, :T], eligible[:, :T]
            attn_mask = attn_mask[..., :T, :T] if attn_mask is not None else None
        t = self.mask_ratio(ids.shape[0], step, g, self.device)
        p_mask = mask_probability(t)
        noisy, masked = apply_random_mask(ids, eligible, p_mask, self.mask_id, g)
        real = batch["doc_ids"][:, : ids.shape[1]] >= 0
        noisy = drop_prompts(noisy, eligible, real, h.prompt_dropout, self.mask_id, g)  # for cfg_scale
        embeds = None
        if h.embed_noise_std > 0 and step < h.embed_noise_steps:
            embeds = self.model.embed(noisy)
            noise = torch.randn(embeds.shape, generator=g, device=self.device, dtype=embeds.dtype)
            embeds = embeds + h.embed_noise_std * noise * masked[..., None]
        logits = self.forward_model(noisy, attn_mask=attn_mask, inputs_embeds=embeds)
        weights = None if h.eos_pad_weight == 1.0 else \
            eos_padding_weights(ids, eligible, self.tokenizer.eos_id, h.eos_pad_weight)
        loss = masked_diffusion_loss(logits, ids, masked, eligible, p_mask, weights)
        self.log("train/mask_ratio", masked.sum() / eligible.sum().clamp(min=1), on_step=True)
        return loss

    def eval_sums(self, batch: dict, batch_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(Monte-Carlo negative-ELBO sum in nats, eligible token count); masks fixed per row by val_seed."""
        g = self.eval_generators(batch, batch_idx, self.hparams.val_seed)
        nll = diffusion_elbo(self.forward_model, batch["input_ids"], batch["eligible"], self.mask_id,
                             num_samples=self.hparams.val_samples, generator=g,
                             attn_mask=self.attention_mask(batch))
        return nll.sum(), batch["eligible"].sum()
