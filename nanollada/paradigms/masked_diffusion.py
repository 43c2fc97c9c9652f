"""The masked-diffusion (LLaDA) paradigm after training: Monte-Carlo likelihood estimates and iterative unmasking.

- sequence NLL: the negative ELBO (``diffusion_elbo``, stratified t, seeded), an upper bound on the NLL;
- minimal pairs: both sentences of a pair scored on the same draws (same masking time and the same uniform number
  per position: both batches padded to one length and drawn from identically seeded generators);
- continuation log-likelihood: LLaDA's conditional estimator (``diffusion_conditional_logprob``), the choices of
  one multiple-choice item on shared draws;
- greedy continuations: one block of exactly the continuation's length, ``LowConfidence(steps=length)``;
- generation: ``diffusion_generate`` with a strategy from the registry in ``sampling.diffusion``.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import torch

from nanollada.evaluation.likelihood import diffusion_conditional_logprob, diffusion_elbo, key_padding_mask
from nanollada.paradigms.base import Generation, Paradigm, ScoringSettings, cpu_generator, register_paradigm
from nanollada.sampling.diffusion import STRATEGIES, LowConfidence, build_strategy, diffusion_generate


def pad_right(rows: list[list[int]], pad_id: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows to T -> ids (B, T) long, real (B, T) bool."""
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    real = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        real[b, : len(r)] = True
    return ids.to(device), real.to(device)


@register_paradigm("diffusion")
class MaskedDiffusionParadigm(Paradigm):
    """A bidirectional mask predictor (LLaDA 1.0): likelihoods are Monte-Carlo bounds, decoding fills masks."""

    exact_likelihood = False
    supports_trace = True

    # ------------------------------------------------------------------ scoring
    def _elbo_rows(self, rows: list[list[int]], T: int, samples: int, generator: torch.Generator) -> torch.Tensor:
        """Negative ELBO (nats) of every row (bos first, everything after bos eligible), padded to T: (B,) float64."""
        ids, real = pad_right(rows, self.tokenizer.pad_id, T, self.device)
        eligible = real.clone()
        eligible[:, 0] = False
        return diffusion_elbo(self.model, ids, eligible, self.tokenizer.mask_id, num_samples=samples,
                              generator=generator, attn_mask=key_padding_mask(real)).double().cpu()

    def sequence_nll(self, rows, s: ScoringSettings):
        g = cpu_generator(s.seed)
        nll = torch.zeros(len(rows), dtype=torch.float64)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), s.batch_size):
            idx = order[start: start + s.batch_size]
            batch = [rows[i] for i in idx]
            nll[idx] = self._elbo_rows(batch, max(map(len, batch)), s.samples, g)
        return nll, torch.tensor([max(len(r) - 1, 0) for r in rows], dtype=torch.long)

    def pair_logprobs(self, first, second, s: ScoringSettings):
        N = len(first)
        sa, sb = torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
        order = sorted(range(N), key=lambda i: max(len(first[i]), len(second[i])))
        for k, start in enumerate(range(0, N, s.batch_size)):
            idx = order[start: start + s.batch_size]
            T = max(max(len(first[i]), len(second[i])) for i in idx)
            seed = s.seed * 1_000_003 + k  # the same draws for both batches
            sa[idx] = -self._elbo_rows([first[i] for i in idx], T, s.samples, cpu_generator(seed))
            sb[idx] = -self._elbo_rows([second[i] for i in idx], T, s.samples, cpu_generator(seed))
        return sa, sb

    def conditional_logprob(self, contexts, targets, s: ScoringSettings, groups=None):
        return diffusion_conditional_logprob(self.model, contexts, targets, self.tokenizer.mask_id,
                                             self.tokenizer.pad_id, num_samples=s.samples,
                                             generator=cpu_generator(s.seed), batch_size=s.batch_size,
                                             groups=groups)

    def greedy_continuations(self, prompts, lengths, s: ScoringSettings):
        tok = self.tokenizer
        out: list[list[int]] = [[] for _ in prompts]
        by_len: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            by_len.setdefault(n, []).append(i)
        for n, members in sorted(by_len.items()):
            members.sort(key=lambda i: len(prompts[i]))
            for start in range(0, len(members), s.batch_size):
                idx = members[start: start + s.batch_size]
                P = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), P), tok.pad_id, dtype=torch.long)
                real = torch.zeros(len(idx), P, dtype=torch.bool)
                for b, i in enumerate(idx):  # left padding, hidden by prompt_mask
                    ids[b, P - len(prompts[i]):] = torch.tensor(prompts[i])
                    real[b, P - len(prompts[i]):] = True
                res = diffusion_generate(self.model, ids.to(self.device), gen_length=n, block_length=n,
                                         strategy=LowConfidence(steps=n), mask_id=tok.mask_id, temperature=0.0,
                                         prompt_mask=None if bool(real.all()) else real.to(self.device),
                                         generator=cpu_generator(s.seed))
                for b, i in enumerate(idx):
                    out[i] = res.generated[b].tolist()
        return out

    def estimate(self, family: str, s: ScoringSettings) -> str:
        if family == "perplexity":
            return f"elbo_bound_{s.samples}_samples"
        if family == "minimal_pairs":
            return f"elbo_{s.samples}_samples_shared_draws"
        return f"llada_conditional_{s.samples}_samples"

    # ------------------------------------------------------------------ generation
    def canvas_length(self, prompt_len: int, settings) -> tuple[int, int]:
        """(gen_length, block_length): ``max_new_tokens`` rounded up to whole blocks, within ``max_seq_len``."""
        room = self.model.cfg.max_seq_len - prompt_len
        block = settings.block_length or min(settings.max_new_tokens, room)
        gen_length = block * math.ceil(min(settings.max_new_tokens, room) / block)
        if gen_length > room:
            gen_length = block * (room // block)
            if gen_length == 0:
                raise ValueError(f"no room for one block of {block} tokens after a {prompt_len}-token prompt "
                                 f"(max_seq_len={self.model.cfg.max_seq_len})")
        return gen_length, block

    def default_generation(self) -> dict:
        """Fast-dLLM confidence-threshold decoding (``threshold``, tau from the settings) with the prefix cache, the
        fastest setting in ``benchmarks/`` (several tokens per forward where the model is sure), at temperature 1
        (Gumbel-max sampling): at temperature 0 small models fill the canvas with newlines / eos (LLaDA issue #59,
        whose advice is a higher temperature); on the tiny diffusion-from-AR model distinct bigrams went from 13%
        to 68% of 64-token answers."""
        return {**super().default_generation(), "temperature": 1.0, "strategy": "threshold",
                "use_prefix_cache": True}

    def decode(self, prompts: list[list[int]], settings, *, stop: bool = True, record_trace=False, on_step=None):
        """Decode a batch of equal-length prompts (B, P) with resolved ``settings``: the sampler's output (the
        canvas ``generated`` (B, G), ``forwards``, ``seconds``). ``stop=False`` drops eos and the stop rules, so
        every row fills the whole canvas (throughput benchmarks)."""
        tok = self.tokenizer
        gen_length, block = self.canvas_length(len(prompts[0]), settings)
        g = torch.Generator(device=self.device).manual_seed(settings.seed)
        step_cb = None if on_step is None else (lambda canvas: on_step(canvas[0].tolist()))
        return diffusion_generate(self.model, torch.tensor(prompts, device=self.device), gen_length=gen_length,
                                  block_length=block, strategy=build_strategy(settings.strategy, settings, block),
                                  mask_id=tok.mask_id, eos_id=tok.eos_id if stop else None,
                                  temperature=settings.temperature, generator=g,
                                  use_prefix_cache=settings.use_prefix_cache, record_trace=record_trace,
                                  on_step=step_cb, cfg_scale=settings.cfg_scale,
                                  end_ids=(tok.im_end_id,) if stop else (), min_new_tokens=settings.min_new_tokens,
                                  eos_after_text=settings.eos_after_text)

    def generate(self, prompt_ids, settings, *, record_trace=False, on_step=None) -> Generation:
        gen_length, block = self.canvas_length(len(prompt_ids), settings)
        out = self.decode([prompt_ids], settings, record_trace=record_trace, on_step=on_step)
        return Generation(tokens=self.cut_at_stop(out.generated[0].tolist()), produced=gen_length,
                          forwards=out.forwards, first_token_seconds=out.first_round_seconds, seconds=out.seconds,
                          extra={"steps_per_block": out.steps_per_block, "block_length": block},
                          trace=[c[0] for c in out.trace], stopped_early=out.stopped_early)

    def decoding_key(self, settings) -> str:
        """The fields this decoder reads: the built strategy's own parameters (``steps`` for the fixed-step
        strategies, ``threshold`` for the threshold ones, ...), the canvas and block, temperature and the caches
        (block diffusion reads ``use_kv_cache``), guidance and the eos rules; the seed only when sampling."""
        s = settings.resolve(self.default_generation()) if hasattr(settings, "resolve") else settings
        block = s.block_length or s.max_new_tokens
        strategy = build_strategy(s.strategy, s, block)
        key = {"strategy": s.strategy, **{k: v for k, v in vars(strategy).items() if not k.startswith("_")},
               "max_new_tokens": s.max_new_tokens, "block_length": block, "temperature": s.temperature,
               "use_prefix_cache": s.use_prefix_cache, "use_kv_cache": s.use_kv_cache, "chat": s.chat,
               "cfg_scale": s.cfg_scale, "min_new_tokens": s.min_new_tokens, "eos_after_text": s.eos_after_text,
               "seed": s.seed if s.temperature else None}
        return json.dumps(key, sort_keys=True, default=str)

    def comparison_runs(self, settings, strategies):
        for name in strategies:
            if name not in STRATEGIES:
                raise ValueError(f"unknown diffusion strategy {name!r}; choose from {sorted(STRATEGIES)}")
        return [(f"{self.name}/{name}", replace(settings, strategy=name)) for name in strategies]
