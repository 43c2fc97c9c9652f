"""The block-diffusion (LLaDA 2.0 BDLM) paradigm after training: block-ELBO bounds and cached block decoding.

- sequence NLL: the Monte-Carlo negative block ELBO (``evaluation.block_likelihood``) at the checkpoint's block
  size, an upper bound on the NLL; minimal pairs on shared draws; continuation log-likelihood: the same bound with
  only the continuation eligible (the context stays clean and visible), a lower-bound estimate of log p;
- greedy continuations: block decoding with one commit per step (``LowConfidence``), no early stop;
- generation: ``sampling.block_diffusion.block_diffusion_generate`` with a strategy from the registry and the
  exact cache of finished blocks (``use_kv_cache``, on by default, is its switch, as for AR: the cache is exact, so
  unlike masked diffusion's approximate ``use_prefix_cache`` it changes speed, never tokens). The decode block is
  ``block_length`` when given, else the block size the checkpoint was trained with.
"""

from __future__ import annotations

import json

import torch

from nanollada.evaluation.block_likelihood import block_diffusion_elbo
from nanollada.paradigms.base import Generation, Paradigm, ScoringSettings, cpu_generator, register_paradigm
from nanollada.paradigms.masked_diffusion import MaskedDiffusionParadigm, pad_right
from nanollada.sampling.block_diffusion import block_diffusion_generate, canvas_length
from nanollada.sampling.diffusion import ConfidenceThreshold, LowConfidence, build_strategy


@register_paradigm("block_diffusion")
class BlockDiffusionParadigm(MaskedDiffusionParadigm):
    """A block-causal mask predictor: bounds per block, decoding block by block against an exact KV cache."""

    exact_likelihood = False
    supports_trace = True
    supports_editing = True
    absolute_blocks = True

    @property
    def block_size(self) -> int:
        return int(self.config.get("block_size", 32))

    # ------------------------------------------------------------------ scoring
    def _elbo(self, rows: list[list[int]], eligible_from: list[int], T: int, samples: int,
              generator: torch.Generator) -> torch.Tensor:
        """Negative block ELBO (nats) of rows padded to T (then to whole blocks), tokens from eligible_from[b] on."""
        block = min(self.block_size, T)
        T = -(-T // block) * block
        ids, real = pad_right(rows, self.tokenizer.pad_id, T, self.device)
        pos = torch.arange(T, device=self.device)[None]
        eligible = real & (pos >= torch.tensor(eligible_from, device=self.device)[:, None])
        docs = torch.where(real, 0, -1)
        return block_diffusion_elbo(self.model, ids, eligible, docs, self.tokenizer.mask_id, block,
                                    num_samples=samples, generator=generator).double().cpu()

    def _elbo_rows(self, rows, T, samples, generator):
        return self._elbo(rows, [1] * len(rows), T, samples, generator)

    def conditional_logprob(self, contexts, targets, s: ScoringSettings, groups=None):
        if any(len(t) == 0 for t in targets):
            raise ValueError("every target needs at least one token")
        g = cpu_generator(s.seed)
        N = len(contexts)
        lp = torch.zeros(N, dtype=torch.float64)
        order = sorted(range(N), key=lambda i: len(contexts[i]) + len(targets[i]))
        for start in range(0, N, s.batch_size):
            idx = order[start: start + s.batch_size]
            rows = [list(contexts[i]) + list(targets[i]) for i in idx]
            lp[idx] = -self._elbo(rows, [len(contexts[i]) for i in idx], max(map(len, rows)), s.samples, g)
        return lp, torch.tensor([len(t) for t in targets], dtype=torch.long)

    def greedy_continuations(self, prompts, lengths, s: ScoringSettings):
        tok, out = self.tokenizer, [[] for _ in prompts]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            groups.setdefault((len(p), n), []).append(i)
        for (P, n), members in sorted(groups.items()):
            G = canvas_length(P, n, self.block_size, self.model.cfg.max_seq_len)
            for start in range(0, len(members), s.batch_size):
                idx = members[start: start + s.batch_size]
                ids = torch.tensor([prompts[i] for i in idx], device=self.device)
                res = block_diffusion_generate(self.model, ids, gen_length=G, block_size=self.block_size,
                                               strategy=LowConfidence(steps=self.block_size), mask_id=tok.mask_id,
                                               temperature=0.0, generator=cpu_generator(s.seed))
                for b, i in enumerate(idx):
                    out[i] = res.generated[b, :n].tolist()
        return out

    def estimate(self, family: str, s: ScoringSettings) -> str:
        if family == "perplexity":
            return f"block_elbo_bound_b{self.block_size}_{s.samples}_samples"
        return f"block_elbo_b{self.block_size}_{s.samples}_samples"

    # ------------------------------------------------------------------ generation
    def default_generation(self) -> dict:
        """LLaDA 2.0's decoding: confidence-threshold commits at tau = 0.95 (LLaDA 2.0 / dInfer; ``threshold``) in
        blocks of the trained size, greedy, with the exact cache of finished blocks (``use_kv_cache``). With
        ``editing`` on, its preset's (tau_mask, tau_edit) decide instead (``editing: custom`` reads ``threshold``)."""
        return {**super().default_generation(), "temperature": 0.0,
                "threshold": 0.95,
                "block_length": self.block_size, "use_prefix_cache": False}

    def decoding_key(self, settings) -> str:
        """The masked-diffusion key plus token editing: with ``editing`` on, the resolved (tau_mask, tau_edit),
        the post-edit step cap and the edit penalty (the strategy is then threshold decoding at tau_mask)."""
        s = settings.resolve(self.default_generation()) if hasattr(settings, "resolve") else settings
        key = json.loads(super().decoding_key(s))
        editing = s.editing_thresholds()
        if editing:
            key.update(strategy="threshold(editing)", threshold=editing[0], editing=list(editing),
                       max_post_edit_steps=s.max_post_edit_steps, edit_penalty=s.edit_penalty)
        return json.dumps(key, sort_keys=True, default=str)

    def decode(self, prompts: list[list[int]], settings, *, stop: bool = True, record_trace=False, on_step=None):
        """Decode a batch of equal-length prompts (B, P), block by block with the exact block cache (see
        ``MaskedDiffusionParadigm.decode``); token editing when ``settings.editing`` is on."""
        tok = self.tokenizer
        block = settings.block_length
        G = canvas_length(len(prompts[0]), settings.max_new_tokens, block, self.model.cfg.max_seq_len)
        g = torch.Generator(device=self.device).manual_seed(settings.seed)
        step_cb = None if on_step is None else (lambda canvas: on_step(canvas[0].tolist()))
        editing = settings.editing_thresholds()  # LLaDA 2.1: (tau_mask, tau_edit), or None
        strategy = ConfidenceThreshold(editing[0]) if editing else build_strategy(settings.strategy, settings, block)
        return block_diffusion_generate(self.model, torch.tensor(prompts, device=self.device), gen_length=G,
                                        block_size=block, strategy=strategy, mask_id=tok.mask_id,
                                        eos_id=tok.eos_id if stop else None, temperature=settings.temperature,
                                        generator=g, use_cache=settings.use_kv_cache, record_trace=record_trace,
                                        on_step=step_cb, edit_threshold=editing[1] if editing else None,
                                        max_post_edit_steps=settings.max_post_edit_steps,
                                        edit_penalty=settings.edit_penalty if editing else 0.0,
                                        cfg_scale=settings.cfg_scale, end_ids=(tok.im_end_id,) if stop else (),
                                        min_new_tokens=settings.min_new_tokens,
                                        eos_after_text=settings.eos_after_text)

    def generate(self, prompt_ids, settings, *, record_trace=False, on_step=None) -> Generation:
        block = settings.block_length
        G = canvas_length(len(prompt_ids), settings.max_new_tokens, block, self.model.cfg.max_seq_len)
        editing = settings.editing_thresholds()
        out = self.decode([prompt_ids], settings, record_trace=record_trace, on_step=on_step)
        extra = {"steps_per_block": out.steps_per_block, "block_length": block}
        if editing:
            extra.update(editing=settings.editing, edits=out.edits, tau_mask=editing[0], tau_edit=editing[1])
        # the canvas ends on a block boundary; the answer keeps at most max_new_tokens of it
        answer = self.cut_at_stop(out.generated[0].tolist())[: settings.max_new_tokens]
        return Generation(tokens=answer, produced=G, forwards=out.forwards,
                          first_token_seconds=out.first_round_seconds, seconds=out.seconds, extra=extra,
                          trace=[c[0] for c in out.trace], stopped_early=out.stopped_early)
