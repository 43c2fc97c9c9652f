"""Likelihood bounds of block diffusion (BD3-LM; LLaDA 2.0 eq. 1), batched and padded, in nats.

The model reads ``x_t ⊕ x_0`` (noisy copy, then clean copy, positions 0..L-1 twice) under
``model.block_diffusion_mask``: a noisy block sees itself and the clean earlier blocks, so one forward gives every
block's denoising term. The negative ELBO of a row is

    sum over blocks k of E_t [ (1 / p_mask(t)) * sum_{masked i in block k} -log p(x_i | x_t of block k, x_0 of blocks < k) ],

an upper bound on the NLL of the eligible tokens (exact chain rule across blocks, the masked-diffusion bound
within each block). With block_size = L it is the masked-diffusion ELBO; with 1, next-token prediction.

Shapes: B batch, L padded length (a multiple of the block size), V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanollada.evaluation.likelihood import Generators, uniform
from nanollada.model import block_diffusion_mask
from nanollada.noise import mask_probability


def block_diffusion_logits(model, noisy: torch.Tensor, clean: torch.Tensor, doc_ids: torch.Tensor,
                           block_size: int, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, L, V) of the noisy half: noisy/clean (B, L) long, doc_ids (B, L) (padding -1).

    ``inputs_embeds`` (B, 2L, d), when given, replaces the embedding of ``noisy ⊕ clean`` (embedding noise)."""
    L = clean.shape[1]
    cfg = getattr(model, "cfg", None)
    if cfg is not None and L > cfg.max_seq_len:
        raise ValueError(f"rows of {L} tokens exceed max_seq_len={cfg.max_seq_len}")
    positions = torch.arange(L, device=clean.device).repeat(2)
    mask = block_diffusion_mask(doc_ids, block_size)
    ids = None if inputs_embeds is not None else torch.cat([noisy, clean], 1)
    return model(ids, attn_mask=mask, positions=positions, inputs_embeds=inputs_embeds)[:, :L]


def pad_to_blocks(ids: torch.Tensor, eligible: torch.Tensor, doc_ids: torch.Tensor, block_size: int,
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (B, T) tensors to a multiple of block_size: pad_id, not eligible, document -1 (never attended)."""
    extra = -ids.shape[1] % block_size
    if not extra:
        return ids, eligible, doc_ids
    B = ids.shape[0]
    return (torch.cat([ids, ids.new_full((B, extra), pad_id)], 1),
            torch.cat([eligible, eligible.new_zeros((B, extra))], 1),
            torch.cat([doc_ids, doc_ids.new_full((B, extra), -1)], 1))


@torch.no_grad()
def block_diffusion_elbo(model, ids: torch.Tensor, eligible: torch.Tensor, doc_ids: torch.Tensor, mask_id: int,
                         block_size: int, *, num_samples: int = 4,
                         generator: Generators = None) -> torch.Tensor:
    """Monte-Carlo negative ELBO per row in nats: (B,) float32, an upper bound on the NLL of the eligible tokens.

    ids (B, L) clean tokens, eligible (B, L) bool (tokens scored; the rest stay visible), doc_ids (B, L) (padding
    -1), L a multiple of block_size. Draw k of ``num_samples`` uses t = (k + u_b) / num_samples (stratified, one u
    per row), p_mask = ``mask_probability(t)``, independent Bernoulli masks (unbiased: E[masked / p_mask] = 1).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    B, L = ids.shape
    u = uniform((B,), generator, ids.device)
    total = torch.zeros(B, dtype=torch.float32, device=ids.device)
    for k in range(num_samples):
        p_mask = mask_probability((k + u) / num_samples)
        masked = (uniform((B, L), generator, ids.device) < p_mask[:, None]) & eligible
        noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
        logits = block_diffusion_logits(model, noisy, ids, doc_ids, block_size)
        ce = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")
        total += (ce * masked).sum(1) / p_mask
    return total / num_samples
