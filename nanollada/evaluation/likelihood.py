"""Likelihoods for both paradigms, batched and padded: exact AR log-probabilities and masked-diffusion estimates.

- ``ar_sequence_logprob``: exact sum of log p(target | context) under a causal model.
- ``diffusion_elbo``: Monte-Carlo negative ELBO (LLaDA eq. 3 / MDLM), an upper bound on the NLL in nats.
- ``diffusion_conditional_logprob``: LLaDA's conditional likelihood estimator (``get_log_likelihood`` in LLaDA's
  evaluation code, Nie et al. 2025, Appendix B.6): mask l ~ U{1..L} answer tokens, weight by L / l.

All values are in nats. Shapes: N items, B batch, T padded length, V vocab, L target length.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from nanollada.model import document_attention_mask
from nanollada.noise import mask_probability


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class RowGenerators(list):
    """One ``torch.Generator`` per row of a batch, for draws that must follow the row (validation seeds them by the
    row's global index). Every draw takes ``width`` uniforms per row and keeps the first T, so a row's draws depend
    neither on the batch it is in nor on the batch's padded length T <= ``width``."""

    def __init__(self, generators: list[torch.Generator], width: int):
        super().__init__(generators)
        self.width = width


Generators = torch.Generator | RowGenerators | None


def uniform(shape: tuple, generator: Generators, device: torch.device) -> torch.Tensor:
    """U(0, 1) of ``shape`` (B,) or (B, T) drawn on the generator's device (reproducible), moved to ``device``;
    with ``RowGenerators`` row b is drawn from its own generator."""
    if isinstance(generator, RowGenerators):
        n = shape[1] if len(shape) > 1 else 1
        if len(generator) != shape[0] or n > generator.width:
            raise ValueError(f"{len(generator)} row generators of width {generator.width} for a draw of {shape}")
        rows = [torch.rand(generator.width, generator=g, device=g.device)[:n] for g in generator]
        return torch.stack(rows).reshape(shape).to(device)
    gen_device = "cpu" if generator is None else generator.device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _pad_pairs(context_ids: list[list[int]], target_ids: list[list[int]], index: list[int], pad_id: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded context+target rows for items ``index`` -> ids (B, T) long, real (B, T) bool, target (B, T) bool."""
    seqs = [list(context_ids[i]) + list(target_ids[i]) for i in index]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    real = torch.zeros(len(seqs), T, dtype=torch.bool)
    target = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (i, s) in enumerate(zip(index, seqs)):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        real[b, : len(s)] = True
        target[b, len(context_ids[i]): len(s)] = True
    return ids.to(device), real.to(device), target.to(device)


def _batches(context_ids: list[list[int]], target_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Item indices grouped into mini-batches of similar total length (less padding); results are scattered back."""
    if len(context_ids) != len(target_ids):
        raise ValueError(f"{len(context_ids)} contexts but {len(target_ids)} targets")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(context_ids)), key=lambda i: len(context_ids[i]) + len(target_ids[i]))
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def ar_sequence_logprob(model, context_ids: list[list[int]], target_ids: list[list[int]], pad_id: int, *,
                        batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log p(target | context) under a causal model: returns (logprob_sum (N,) float64, n_tokens (N,) long).

    Each item is the sequence context + target; token j is scored by the logits at position j - 1. Callers should
    start every context with bos: with an empty context the first target token has nothing to condition on, so it
    serves as context and is not scored (``n_tokens`` then counts one token fewer). Rows are right-padded, which a
    causal model never attends to from a real position, so no attention mask is needed and the result does not
    depend on the batch it is scored in. Items are processed in length-sorted mini-batches of ``batch_size``.
    """
    device = _device(model)
    N = len(context_ids)
    logprob = torch.zeros(N, dtype=torch.float64)
    counts = torch.zeros(N, dtype=torch.long)
    for index in _batches(context_ids, target_ids, batch_size):
        ids, _, target = _pad_pairs(context_ids, target_ids, index, pad_id, device)
        if ids.shape[1] < 2:
            continue  # nothing scoreable (one token at most per row)
        logits = model(ids[:, :-1])  # (B, T-1, V); position j-1 predicts token j
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        scored = target[:, 1:]
        logprob[index] = (-(nll * scored).sum(1)).double().cpu()
        counts[index] = scored.sum(1).cpu()
    return logprob, counts


@torch.no_grad()
def diffusion_elbo(model: Callable[..., torch.Tensor], ids: torch.Tensor, eligible: torch.Tensor, mask_id: int, *,
                   num_samples: int = 8, generator: Generators = None,
                   attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Monte-Carlo negative ELBO per row in nats (an upper bound on the NLL of the eligible tokens): (B,) float32.

    For each of ``num_samples`` draws, row b gets a stratified masking time t_k = (k + u_b) / num_samples
    (k = 0..num_samples-1, one u_b ~ U(0, 1) per row), p_mask = ``mask_probability(t)``; every eligible token is
    masked independently with probability p_mask and the row scores sum_{masked} CE / p_mask (LLaDA eq. 3). The draws
    are averaged. Per-token values are ``result / eligible.sum(1)``; rows with nothing eligible give 0.

    Masking is plain Bernoulli, as in training (``noise.apply_random_mask``): a draw may mask nothing in a row (it
    then scores 0), and with independent masks E[masked / p_mask] = 1 for every token, so the estimate is unbiased.

    Args:
        model: Callable ``model(ids, attn_mask=...) -> logits (B, T, V)``: a bidirectional ``Transformer``.
        ids: Clean token ids (B, T) long.
        eligible: (B, T) bool, the tokens to score (may be masked); the rest (prompt, padding) stay visible.
        mask_id: The mask token id.
        num_samples: Monte-Carlo draws (one forward each).
        generator: Seeds every draw, so validation is repeatable; ``RowGenerators`` seed each row's own.
        attn_mask: Optional bool (B or 1, 1, T, T) padding/document mask passed to the model.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    B, T = ids.shape
    eligible = eligible.bool()
    u = uniform((B,), generator, ids.device)
    total = torch.zeros(B, dtype=torch.float32, device=ids.device)
    for k in range(num_samples):
        p_mask = mask_probability((k + u) / num_samples)  # (B,)
        masked = (uniform((B, T), generator, ids.device) < p_mask[:, None]) & eligible
        noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
        logits = model(noisy, attn_mask=attn_mask)
        ce = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")  # (B, T)
        total += (ce * masked).sum(1) / p_mask
    return total / num_samples


def key_padding_mask(real: torch.Tensor) -> torch.Tensor | None:
    """real (B, T) bool -> bidirectional (B, 1, T, T) mask where real tokens see only real tokens and each padding
    position sees only padding (never an empty row); None when nothing is padded (fast attention path)."""
    if bool(real.all()):
        return None
    return document_attention_mask(torch.where(real, 0, -1), causal=False)


def _group_draws(groups: list, target_ids: list[list[int]], num_samples: int,
                 generator: torch.Generator | None) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
    """Per group: one u ~ U(0, 1) (sets l_0) and ``num_samples`` rank-score rows over its longest target (a shorter
    target uses the last columns).

    Returns (group index of every pair, u (G,), scores: G tensors (num_samples, L_max of the group)), on the CPU."""
    index: dict = {}
    owner = [index.setdefault(g, len(index)) for g in groups]
    longest = [0] * len(index)
    for j, t in zip(owner, target_ids):
        longest[j] = max(longest[j], len(t))
    u = uniform((len(index),), generator, torch.device("cpu"))
    scores = [uniform((num_samples, n), generator, torch.device("cpu")) for n in longest]
    return owner, u, scores


@torch.no_grad()
def diffusion_conditional_logprob(model, context_ids: list[list[int]], target_ids: list[list[int]], mask_id: int,
                                  pad_id: int, *, num_samples: int = 32, generator: torch.Generator | None = None,
                                  batch_size: int = 16, groups: list[int] | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's Monte-Carlo estimate of log p(target | context): returns (logprob (N,) float64, n_tokens (N,) long).

    Per item with L target tokens and each sample k = 0..num_samples-1: l_k = ((round(l_0 + k L / num_samples) - 1)
    mod L) + 1 with l_0 = floor(u L) + 1, u ~ U(0, 1) (so l_0 ~ U{1..L}; LLaDA's stratified ``linspace``, so the l_k
    spread evenly over 1..L); exactly l_k of the L target tokens are masked uniformly at random (the l_k lowest of L
    U(0, 1) rank scores), the context is never masked, and the sample scores -sum_{masked} CE * L / l_k. Samples are
    averaged. Its expectation is LLaDA's eq. 6 bound (a lower bound on log p under a perfect-training assumption);
    with all-zero logits it is -L ln V exactly for any draw.

    ``groups`` (an item id per pair, e.g. the question a choice belongs to) makes the pairs of one group share their
    Monte-Carlo draws: one u (so pairs of equal target length get the same l_k, and l_k / L stays close otherwise)
    and, per sample, one rank score per target position counted from the target's end (the j-th last token of every
    target of the group gets the same score, so a suffix the choices share -- the rest of a cloze sentence after the
    blank -- is masked alike even when the choices differ in length), so the choices of an item are compared on the
    same noise and the estimator's noise largely cancels in their differences. Each pair's own draws have exactly
    the distribution above, so every estimate stays unbiased. With groups the results do not depend on
    ``batch_size``; ``groups=None`` draws per mini-batch (and gives the numbers it gave before groups existed).

    Args:
        model: A bidirectional ``Transformer`` (``causal=False``).
        context_ids / target_ids: N items; targets must be non-empty. Rows are right-padded with ``pad_id`` and a
            key-padding mask keeps padding out of every real token's attention.
        mask_id: The mask token id.
        num_samples: Monte-Carlo samples per item (LLaDA uses 128 for multiple choice).
        generator: Seeds every draw (without ``groups`` results also depend on ``batch_size``, which groups the
            draws).
        batch_size: Items per forward.
        groups: Optional group id per item (N entries); None = independent draws per item.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if any(len(t) == 0 for t in target_ids):
        raise ValueError("every target needs at least one token")
    if groups is not None and len(groups) != len(target_ids):
        raise ValueError(f"{len(groups)} groups for {len(target_ids)} items")
    device = _device(model)
    N = len(context_ids)
    logprob = torch.zeros(N, dtype=torch.float64)
    counts = torch.tensor([len(t) for t in target_ids], dtype=torch.long)
    batches = _batches(context_ids, target_ids, batch_size)
    if groups is not None:
        owner, group_u, group_scores = _group_draws(groups, target_ids, num_samples, generator)
    for index in batches:
        ids, real, target = _pad_pairs(context_ids, target_ids, index, pad_id, device)
        B, T = ids.shape
        attn_mask = key_padding_mask(real)
        L = target.sum(1)  # (B,)
        if groups is None:
            u = uniform((B,), generator, device)
        else:
            u = group_u[[owner[i] for i in index]].to(device)
            shared = torch.full((num_samples, B, T), 2.0)  # non-targets rank last
            for b, i in enumerate(index):  # aligned at the target's end: a suffix the choices share is masked alike
                c, n, scores = len(context_ids[i]), len(target_ids[i]), group_scores[owner[i]]
                shared[:, b, c: c + n] = scores[:, scores.shape[1] - n:]
            shared = shared.to(device)
        l0 = (u * L).floor().long().clamp(max=L - 1) + 1  # U{1..L}
        total = torch.zeros(B, dtype=torch.float64, device=device)
        for k in range(num_samples):
            l = ((torch.round(l0 + k * L.double() / num_samples).long() - 1) % L) + 1  # (B,) in 1..L
            score = uniform((B, T), generator, device).masked_fill(~target, 2.0) if groups is None else shared[k]
            rank = score.argsort(1).argsort(1)
            masked = rank < l[:, None]  # exactly l random target positions
            noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
            logits = model(noisy, attn_mask=attn_mask)
            ce = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")  # (B, T)
            total -= (ce * masked).sum(1).double() * L.double() / l.double()
        logprob[index] = (total / num_samples).cpu()
    return logprob, counts


def nats_to_ppl(nll_sum: float, n_tokens: int) -> float:
    """Perplexity exp(nll / tokens) from a summed NLL (or negative ELBO) in nats."""
    return math.exp(nll_sum / max(n_tokens, 1))
