"""A ``nanollada`` model for EleutherAI's lm-evaluation-harness (``pip install 'nanollada[eval]'``).

Importing this module registers :class:`NanoLLaDALM` under the name ``nanollada``; ``nanollada lm-eval ...`` (see
:func:`main`) does that and then runs lm-eval's own command line, so every lm-eval flag works::

    nanollada lm-eval --model_args ckpt=logs/x/checkpoints/last.ckpt,samples=32 --tasks lambada_openai,wikitext \\
        --include_path my_tasks/ --batch_size 16 --output_path results/

or from Python: ``NanoLLaDALM(ckpt=...)`` (or ``NanoLLaDALM(loaded=LoadedModel)``) passed to
``lm_eval.simple_evaluate(model=..., tasks=[...])``, or :func:`evaluate`.

Every request goes through the checkpoint's ``nanollada.paradigms.Paradigm``, exactly as ``nanollada eval`` scores:

- ``loglikelihood(context, continuation)``: ``conditional_logprob`` of the continuation's tokens after ``bos`` +
  the context's (tokenised separately; trailing whitespace of the context moves to the continuation, as lm-eval's
  Hugging Face model does). AR: exact. Diffusion: LLaDA's Monte-Carlo conditional estimator with ``samples`` draws
  (model argument), the requests of one document (the choices of one question) on shared draws. ``is_greedy`` is
  whether the paradigm's greedy continuation of the same length (``greedy_continuations``) reproduces the
  continuation (model argument ``greedy=False`` skips that decode and answers False).
- ``loglikelihood_rolling(text)``: ``rolling_nll`` of ``bos`` + text (no eos), windows past ``max_seq_len`` with
  ``stride`` new tokens each. AR: exact. Diffusion: a Monte-Carlo ELBO **bound** (the perplexities lm-eval reports
  are upper bounds); a warning says so.
- ``generate_until(context, gen_kwargs)``: ``Paradigm.generate`` with the model arguments' ``GenerationSettings``
  (the checkpoint's paradigm defaults for the fields not given), ``max_gen_toks`` as ``max_new_tokens``, greedy
  (``greedy``: temperature 0, top-p and repetition penalty off unless given) unless the task asks for
  ``do_sample``/a temperature; generation stops as soon as a stop
  sequence (``until``) appears and the text is cut before it. Prompts longer than the room left are cut from the
  left (bos kept). SFT checkpoints get the chat template unless ``chat=False``.

Model arguments (``--model_args k=v,...``): ``ckpt`` (required unless ``loaded``), ``device`` (auto), ``batch_size``,
``samples`` (8), ``seed`` (0), ``stride`` (None = max_seq_len // 2), ``greedy`` (True), ``max_gen_toks`` (128), and
any ``GenerationSettings`` field (``strategy``, ``steps``, ``block_length``, ``threshold``, ``temperature``, ...).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import fields, replace

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from nanollada.evaluation.runner import fit_length
from nanollada.paradigms.base import ScoringSettings

log = logging.getLogger(__name__)


def _none(v):
    return None if isinstance(v, str) and v.lower() == "none" else v


@register_model("nanollada")
class NanoLLaDALM(LM):
    """lm-eval's ``LM`` over a nanollada checkpoint of any paradigm (see the module docstring)."""

    def __init__(self, ckpt: str | None = None, loaded=None, device: str | None = None, batch_size=16,
                 max_batch_size=None, samples: int = 8, seed: int = 0, stride: int | None = None,
                 greedy: bool = True, max_gen_toks: int = 128, **generation) -> None:
        super().__init__()
        from nanollada.generate import GenerationSettings
        if loaded is None:
            if not ckpt:
                raise ValueError("the nanollada lm-eval model needs --model_args ckpt=PATH")
            from nanollada.commands import _device
            from nanollada.loading import load_checkpoint
            device = _device(device or "auto")
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes its default "cuda:0" when --device is not given
                log.warning("device %s is not available; using the CPU", device)
                device = "cpu"
            loaded = load_checkpoint(str(ckpt), device)
        self.loaded = loaded
        self.iface = loaded.interface
        self.tok = loaded.tokenizer
        self.max_len = loaded.model.cfg.max_seq_len
        bs = _none(batch_size)
        bs = 16 if bs in (None, "auto") or str(bs).startswith("auto") else int(bs)
        self.scoring = ScoringSettings(batch_size=bs, samples=int(samples), seed=int(seed),
                                       stride=None if _none(stride) is None else int(stride))
        self.greedy = bool(greedy)
        self.max_gen_toks = int(max_gen_toks)
        known = {f.name for f in fields(GenerationSettings)}
        unknown = sorted(set(generation) - known)
        if unknown:
            raise ValueError(f"unknown nanollada model_args {unknown}: known are ckpt, device, batch_size, samples, "
                             f"seed, stride, greedy, max_gen_toks and the GenerationSettings fields {sorted(known)}")
        self.generation = GenerationSettings(**{k: _none(v) for k, v in generation.items()})
        self._device = loaded.model.embed.weight.device if hasattr(loaded.model, "embed") else None
        self._warned_bound = False

    # ------------------------------------------------------------------ lm-eval's interface
    @property
    def tokenizer_name(self) -> str:
        return f"nanollada-{self.tok.fingerprint()}"

    @property
    def estimate(self) -> str:
        """How ``loglikelihood_rolling`` values are obtained (``exact`` or the paradigm's estimator)."""
        return self.iface.estimate("perplexity", self.scoring)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = [self.tok.bos_id] + (self.tok.encode(context) if context else [])
        return ctx, self.tok.encode(continuation)

    @torch.no_grad()
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        ctxs, tgts, keys, empty = [], [], [], set()
        for i, req in enumerate(requests):
            ctx, tgt = self._encode_pair(*req.args)
            if not tgt:
                empty.add(i)
                continue
            ctx, tgt, _ = fit_length(ctx, tgt, self.max_len)
            ctxs.append(ctx)
            tgts.append(tgt)
            keys.append((getattr(req, "task_name", None), getattr(req, "doc_id", None), i if getattr(
                req, "doc_id", None) is None else None))
        group_ids: dict = {}
        groups = [group_ids.setdefault(k, len(group_ids)) for k in keys]
        lp, _ = self.iface.conditional_logprob(ctxs, tgts, self.scoring, groups=groups) if ctxs else ([], [])
        greedy = [False] * len(ctxs)
        if self.greedy and ctxs:
            gens = self.iface.greedy_continuations(ctxs, [len(t) for t in tgts], self.scoring)
            greedy = [list(g) == list(t) for g, t in zip(gens, tgts)]
        out, j = [], 0
        for i, req in enumerate(requests):
            if i in empty:
                res = (0.0, True)
            else:
                res = (float(lp[j]), bool(greedy[j]))
                j += 1
            self.cache_hook.add_partial("loglikelihood", req.args, res)
            out.append(res)
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if not self.iface.exact_likelihood and not self._warned_bound:
            self._warned_bound = True
            msg = (f"[nanollada] loglikelihood_rolling of a {self.iface.name} checkpoint is a Monte-Carlo ELBO bound "
                   f"({self.estimate}): word/byte perplexities are upper bounds")
            log.warning(msg)
            print(msg, file=sys.stderr)
        rows = [[self.tok.bos_id] + self.tok.encode(req.args[0]) for req in requests]
        nll, _ = self.iface.rolling_nll(rows, self.scoring)
        out = [-float(v) for v in nll]
        for req, v in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, v)
        return out

    def _settings_for(self, gen_kwargs: dict):
        kw = dict(gen_kwargs or {})
        s = replace(self.generation, max_new_tokens=int(kw.get("max_gen_toks", self.max_gen_toks)))
        if "temperature" in kw and (kw.get("do_sample") or kw["temperature"]):
            s = replace(s, temperature=float(kw["temperature"]))
        elif not kw.get("do_sample", False):  # lm-eval's generate_until is greedy unless the task samples
            s = replace(s, temperature=0.0, **({"greedy": True} if hasattr(s, "greedy") else {}))
        return s

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from nanollada.generate import encode_prompt
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            until = (gen_kwargs or {}).get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            s = self._settings_for(gen_kwargs)
            s = replace(s, max_new_tokens=max(1, min(s.max_new_tokens, self.max_len - 2)))
            ids = encode_prompt(self.iface, context, s.chat) if context.strip() else [self.tok.bos_id]
            keep = self.max_len - s.max_new_tokens
            if len(ids) > keep:
                ids = ids[:1] + ids[len(ids) - (keep - 1):]

            def on_step(tokens: list[int]) -> bool:
                if not until:
                    return False
                if self.tok.mask_id in tokens:
                    tokens = tokens[: tokens.index(self.tok.mask_id)]
                text = self.tok.decode(self.iface.cut_at_stop(tokens))
                return any(u in text for u in until)

            g = self.iface.generate(ids, s, on_step=on_step)
            text = self.tok.decode(g.tokens[: s.max_new_tokens])  # a diffusion canvas may round up to whole blocks
            cuts = [text.index(u) for u in until if u in text]
            text = text[: min(cuts)] if cuts else text
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


def evaluate(model: NanoLLaDALM | str, tasks: list[str], include_path: str | list[str] | None = None,
             model_args: str | dict | None = None, include_defaults: bool = True, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` with the ``nanollada`` model: ``model`` is a :class:`NanoLLaDALM` or a checkpoint
    path; ``include_path`` adds local task YAMLs (``include_defaults=False``: only those, a much faster start);
    other keyword arguments go to ``simple_evaluate``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    if isinstance(model, str):
        args = {"ckpt": model, **(model_args if isinstance(model_args, dict) else {})}
        if isinstance(model_args, str):
            from lm_eval.utils import simple_parse_args_string
            args.update(simple_parse_args_string(model_args))
        model = NanoLLaDALM(**args)
    return simple_evaluate(model=model, tasks=list(tasks),
                           task_manager=TaskManager(include_path=include_path, include_defaults=include_defaults),
                           **kwargs)


SUBCOMMANDS = ("run", "ls", "validate")


def lm_eval_argv(argv: list[str]) -> list[str]:
    """lm-eval's command line for ``nanollada lm-eval ARGV``: ``--model nanollada`` added to a run unless given."""
    argv = list(argv)
    sub = argv[:1] if argv and argv[0] in SUBCOMMANDS else []
    rest = argv[len(sub):]
    if (not sub or sub == ["run"]) and rest and not any(a == "--model" or a.startswith("--model=") for a in rest):
        rest = ["--model", "nanollada"] + rest
    return (sub or (["run"] if rest else [])) + rest


LOCAL_ONLY = "--local_tasks_only"


def main(argv: list[str]) -> None:
    """``nanollada lm-eval``: register the model, then hand the command line to lm-eval's own CLI.

    One flag of its own, ``--local_tasks_only``: index only the ``--include_path`` task YAMLs, not lm-eval's ~200
    built-in task folders (which takes tens of seconds on a small CPU); every other flag is lm-eval's."""
    from lm_eval.__main__ import cli_evaluate
    argv = list(argv)
    local_only = LOCAL_ONLY in argv
    argv = [a for a in argv if a != LOCAL_ONLY]
    old_argv = sys.argv
    sys.argv = ["lm-eval", *lm_eval_argv(argv)]
    patched = None
    if local_only:
        from lm_eval.tasks import TaskManager
        patched = TaskManager.__init__

        def init(self, *args, **kwargs):
            kwargs["include_defaults"] = False
            patched(self, *args, **kwargs)
        TaskManager.__init__ = init
    try:
        cli_evaluate()
    finally:
        sys.argv = old_argv
        if patched is not None:
            TaskManager.__init__ = patched
