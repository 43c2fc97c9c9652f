"""Mask-ratio samplers for masked diffusion training: how much of each sequence to mask.

Contract (every sampler): ``sampler(batch_size, step, generator, device) -> t`` of shape (B,), float32, values in
(0, 1]; t is the masking *time*. The per-token masking probability is ``p_mask = (1 - eps) * t + eps`` (LLaDA,
``eps = 1e-3``), so it never reaches zero and the ELBO weight 1/p_mask stays finite. ``step`` is the optimizer step
(only the schedule-driven sampler uses it); ``generator`` makes the draw reproducible.

Samplers:
- ``IIDTime``: t ~ U(0, 1) independently per row (LLaDA eq. 3).
- ``StratifiedTime``: antithetic/stratified t across the batch, t_i = (i + u) / B with one shared u (MDLM); lower
  variance for the same expectation.
- ``ClippedBand``: t ~ U(low, high) (BD3-LM's clipped schedule; LLaDA 2.0 SFT uses 0.3-0.8). Not an unbiased ELBO.
- ``WSDMaskRatio``: the v0.1.0 report's warmup-stable-decay schedule of the *mean* mask ratio over training steps:
  the band centre rises from ``start`` to ``peak`` during warmup, stays, then decays to ``end``; t is drawn uniformly
  in a band of half-width ``spread`` around it.
"""

from __future__ import annotations

import torch

EPS = 1e-3


def mask_probability(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """p_mask = (1 - eps) * t + eps, elementwise (B,)."""
    return (1 - eps) * t + eps


class MaskRatioSampler:
    """Base class; subclasses implement ``__call__`` with the contract in the module docstring."""

    def __call__(self, batch_size: int, step: int = 0, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _uniform(n: int, generator, device) -> torch.Tensor:
        return torch.rand(n, generator=generator, device="cpu" if generator is None else generator.device).to(device)


class IIDTime(MaskRatioSampler):
    """t ~ U(0, 1) independently for each row (LLaDA)."""

    def __call__(self, batch_size, step=0, generator=None, device="cpu"):
        return self._uniform(batch_size, generator, device)


class StratifiedTime(MaskRatioSampler):
    """Antithetic/stratified t: t_i = (i + u) / B with one u ~ U(0, 1) shared by the batch, rows shuffled (MDLM)."""

    def __call__(self, batch_size, step=0, generator=None, device="cpu"):
        u = self._uniform(1, generator, device)
        perm = torch.randperm(batch_size, generator=generator,
                              device="cpu" if generator is None else generator.device).to(device)
        return (perm.float() + u) / batch_size


class ClippedBand(MaskRatioSampler):
    """t ~ U(low, high) (BD3-LM clipped schedule; LLaDA 2.0 SFT uses low=0.3, high=0.8).

    Args:
        low: Smallest masking time, in [0, 1).
        high: Largest masking time, in (low, 1].
    """

    def __init__(self, low: float = 0.3, high: float = 0.8):
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"ClippedBand needs 0 <= low < high <= 1, got low={low}, high={high}")
        self.low, self.high = low, high

    def __call__(self, batch_size, step=0, generator=None, device="cpu"):
        return self.low + (self.high - self.low) * self._uniform(batch_size, generator, device)


class WSDMaskRatio(MaskRatioSampler):
    """Warmup-stable-decay schedule of the mean mask ratio over optimizer steps (nano-llada v0.1.0 report).

    Args:
        warmup_steps: Steps over which the centre rises linearly from ``start`` to ``peak``.
        stable_steps: Steps the centre stays at ``peak``.
        decay_steps: Steps over which it falls linearly to ``end`` (and stays there).
        start: Centre at step 0.
        peak: Centre during the stable phase.
        end: Centre after decay.
        spread: Half-width of the uniform band around the centre; t is clamped to [0.01, 1].
    """

    def __init__(self, warmup_steps: int = 1000, stable_steps: int = 8000, decay_steps: int = 1000,
                 start: float = 0.15, peak: float = 0.5, end: float = 0.3, spread: float = 0.2):
        if min(warmup_steps, stable_steps, decay_steps) < 0:
            raise ValueError("WSDMaskRatio step counts must be >= 0")
        self.warmup, self.stable, self.decay = warmup_steps, stable_steps, decay_steps
        self.start, self.peak, self.end, self.spread = start, peak, end, spread

    def centre(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (self.peak - self.start) * step / max(1, self.warmup)
        step -= self.warmup
        if step < self.stable:
            return self.peak
        step -= self.stable
        return self.peak + (self.end - self.peak) * min(1.0, step / max(1, self.decay))

    def __call__(self, batch_size, step=0, generator=None, device="cpu"):
        u = self._uniform(batch_size, generator, device)
        return (self.centre(step) + self.spread * (2 * u - 1)).clamp(0.01, 1.0)


def apply_random_mask(input_ids: torch.Tensor, eligible: torch.Tensor, p_mask: torch.Tensor, mask_id: int,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each eligible token independently with its row's probability (LLaDA's forward process).

    input_ids (B, T) long, eligible (B, T) bool, p_mask (B,) -> (noisy_ids (B, T), masked (B, T) bool).
    A row may come out with nothing masked (likely for a short answer at small t); it then contributes zero to the
    loss. That keeps the loss unbiased: E[masked_i / p_mask] = 1 for every eligible token. (Forcing one masked
    token into such rows while keeping its 1/p_mask weight, as earlier versions did, biased the loss upwards by
    E_t[(1 - p)^n / p] / n: +1.25% at n = 128 tokens, +93% at n = 5. LLaDA has no such rule.)
    """
    gen_device = "cpu" if generator is None else generator.device
    u = torch.rand(input_ids.shape, generator=generator, device=gen_device).to(input_ids.device)
    masked = (u < p_mask[:, None]) & eligible
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids), masked


def drop_prompts(noisy: torch.Tensor, eligible: torch.Tensor, real: torch.Tensor, prob: float, mask_id: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt dropout for classifier-free guidance: with probability ``prob`` per row, every real non-eligible
    token (the SFT prompt) becomes ``mask_id``; noisy/eligible/real (B, T) -> (B, T). Those positions are never
    loss targets, so the row teaches the unconditional distribution p(answer | no prompt)."""
    if prob <= 0:
        return noisy
    gen_device = "cpu" if generator is None else generator.device
    drop = torch.rand(noisy.shape[0], generator=generator, device=gen_device).to(noisy.device) < prob
    return torch.where(drop[:, None] & ~eligible & real, torch.full_like(noisy, mask_id), noisy)
