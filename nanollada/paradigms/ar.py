"""The autoregressive paradigm after training: exact likelihoods and KV-cache decoding (``sampling.ar``)."""

from __future__ import annotations

import json

import torch

from nanollada.evaluation.likelihood import ar_sequence_logprob
from nanollada.paradigms.base import Generation, Paradigm, ScoringSettings, register_paradigm
from nanollada.sampling.ar import ar_generate


@register_paradigm("ar")
class ARParadigm(Paradigm):
    """A causal backbone: every likelihood is exact (chain rule); generation samples one token per forward."""

    exact_likelihood = True

    def sequence_nll(self, rows, s: ScoringSettings):
        lp, n = ar_sequence_logprob(self.model, [r[:1] for r in rows], [r[1:] for r in rows], self.tokenizer.pad_id,
                                    batch_size=s.batch_size)
        return -lp, n

    def conditional_logprob(self, contexts, targets, s: ScoringSettings, groups=None):
        return ar_sequence_logprob(self.model, contexts, targets, self.tokenizer.pad_id, batch_size=s.batch_size)

    def greedy_continuations(self, prompts, lengths, s: ScoringSettings):
        out: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (lengths[i], len(prompts[i])))
        for start in range(0, len(order), s.batch_size):
            idx = order[start: start + s.batch_size]
            # every row fits max_seq_len alone; a left-padded batch may not (longest prompt + longest continuation)
            fits = max(len(prompts[i]) for i in idx) + max(lengths[i] for i in idx) - 1 <= self.model.cfg.max_seq_len
            for part in [idx] if fits else [[i] for i in idx]:
                res = ar_generate(self.model, [prompts[i] for i in part], max_new_tokens=max(lengths[i] for i in part),
                                  temperature=0.0, eos_id=None, pad_id=self.tokenizer.pad_id, use_kv_cache=True)
                for i, g in zip(part, res.generated):
                    out[i] = g[: lengths[i]]
        return out

    def default_generation(self) -> dict:
        """Nucleus sampling as in MiniMind's chat (temperature 0.7, top-p 0.9) plus a mild repetition penalty (1.1):
        greedy decoding of small models loops ("the be the be ..."); on the tiny main-job model 0.7 / 0.9 gave
        more real words than MiniMind's 0.85 / 0.95 at the same diversity. ``greedy`` is one flag away."""
        return {**super().default_generation(), "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}

    def decoding_key(self, settings) -> str:
        """Only the fields AR decoding reads (the diffusion knobs do not change it); the seed only when sampling."""
        s = settings.resolve(self.default_generation()) if hasattr(settings, "resolve") else settings
        keep = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "use_kv_cache", "chat")
        key = {k: getattr(s, k) for k in keep}
        key["seed"] = s.seed if s.temperature else None
        return json.dumps(key, sort_keys=True, default=str)

    def decode(self, prompts: list[list[int]], settings, *, stop: bool = True):
        """Decode a batch of prompts with the KV cache and resolved ``settings``: the sampler's output
        (``generated``, ``forwards``, ``seconds``); ``stop=False`` ignores eos, so every row gets
        ``max_new_tokens`` (throughput benchmarks)."""
        tok = self.tokenizer
        g = torch.Generator(device=self.device).manual_seed(settings.seed)
        return ar_generate(self.model, prompts, max_new_tokens=settings.max_new_tokens,
                           temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                           repetition_penalty=settings.repetition_penalty, eos_id=tok.eos_id if stop else None,
                           pad_id=tok.pad_id, use_kv_cache=settings.use_kv_cache, generator=g)

    def generate(self, prompt_ids, settings, *, record_trace=False, on_step=None) -> Generation:
        if record_trace:
            raise ValueError("a denoising trace needs a diffusion checkpoint (this one is autoregressive)")
        tok = self.tokenizer
        room = self.model.cfg.max_seq_len - len(prompt_ids) + 1  # the last new token is never fed back
        answer: list[int] = []
        client_stop = []

        def on_token(nxt: torch.Tensor) -> bool:
            t = int(nxt[0])
            if t in self.stop_ids():  # eos or <|im_end|>, whichever comes first, ends the answer
                return True
            answer.append(t)
            if on_step is not None and on_step(list(answer)):
                client_stop.append(True)
                return True
            return False

        g = torch.Generator(device=self.device).manual_seed(settings.seed)
        out = ar_generate(self.model, [prompt_ids], max_new_tokens=min(settings.max_new_tokens, room),
                          temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                          repetition_penalty=settings.repetition_penalty, eos_id=tok.eos_id, pad_id=tok.pad_id,
                          use_kv_cache=settings.use_kv_cache, generator=g, on_token=on_token)
        produced = list(out.generated[0])
        return Generation(tokens=self.cut_at_stop(produced), produced=len(produced) + int(out.stopped_at_eos[0]),
                          forwards=out.forwards, first_token_seconds=out.first_token_seconds, seconds=out.seconds,
                          stopped_early=bool(client_stop))
