"""The one interface every paradigm implements for everything after training, and the registry that picks it.

Training differs per paradigm (its LightningModule in ``nanollada.lm`` and its collate); everything after training
-- the NLL of a sequence, the log-likelihood of a continuation, the scores of each evaluation family, and
generation from a ``GenerationSettings`` -- goes through a :class:`Paradigm`. ``predict``, ``compare``, ``eval``,
``export`` and the benchmarks call only this interface; none of them compares paradigm names. A new paradigm is a
new subclass registered with :func:`register_paradigm` under the name its LightningModule writes into checkpoints.

Why a package of its own rather than methods on the LightningModules: inference runs without Lightning (a
checkpoint or an export is loaded by ``nanollada.loading`` with torch and the backbone only), and the modules stay
thin -- a loss and a collate. Why not inside ``sampling/`` or ``evaluation/``: a paradigm's scoring and its
decoding belong together (both decide how the backbone is fed), and a reader finds all of one paradigm in one file.

Conventions: token ids are Python lists, every scored sequence starts with ``bos``, log-likelihoods are in nats,
float64 on the CPU. Shapes: N items.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar

import torch

PARADIGMS: dict[str, type["Paradigm"]] = {}


def register_paradigm(name: str):
    """Class decorator: ``name`` is the ``paradigm`` key the matching LightningModule writes into checkpoints."""
    def deco(cls):
        cls.name = name
        PARADIGMS[name] = cls
        return cls
    return deco


def paradigm_class(name: str) -> type["Paradigm"]:
    """The registered :class:`Paradigm` for a checkpoint's ``paradigm`` key (clear error for unknown ones)."""
    import nanollada.paradigms  # noqa: F401  (registers the built-in paradigms)
    if name not in PARADIGMS:
        raise ValueError(f"unknown paradigm {name!r} (known: {sorted(PARADIGMS)}); was the checkpoint written by a "
                         "newer nanollada?")
    return PARADIGMS[name]


@dataclass
class ScoringSettings:
    """Scoring settings shared by every evaluation family.

    Args:
        batch_size: Sequences per forward.
        samples: Monte-Carlo samples of the estimators that need them (diffusion ELBO draws / conditional samples).
        choice_samples: Samples for the families that pick among options (multiple choice, context choice): with
            few draws their predictions flip from seed to seed (README: 4 samples agree on 62.5% of predictions,
            32 on 82.5%). None = ``samples``; ``nanollada eval`` defaults it to 32 (LLaDA uses 128).
        seed: Seed of every random draw, so results are repeatable.
        stride: Tokens scored per window after the first when a text is longer than ``max_seq_len``
            (:func:`rolling_windows`); None = half of ``max_seq_len``.
    """

    batch_size: int = 16
    samples: int = 8
    choice_samples: int | None = None
    seed: int = 0
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.choice_samples is not None and self.choice_samples < 1:
            raise ValueError(f"choice_samples must be >= 1, got {self.choice_samples}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")


def rolling_windows(row: list[int], max_len: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, target) windows that score every token of a bos-first ``row`` once within ``max_len``.

    The first window is (``row[:1]``, ``row[1:max_len]``); each later one scores the next ``stride`` tokens
    (default ``max_len // 2``, at most ``max_len - 2``; the last window may be shorter) with bos plus the
    ``max_len - 1 - len(target)`` (at least one) tokens just before them as context, so every window is at most
    ``max_len`` tokens and starts with bos. A row that fits has one window."""
    stride = max(1, max_len // 2) if stride is None else stride
    if not 1 <= stride <= max_len - 2:  # bos + at least one token of context
        raise ValueError(f"stride must be in [1, max_seq_len - 2 = {max_len - 2}], got {stride}")
    windows = [(row[:1], row[1:max_len])]
    pos = max_len
    while pos < len(row):
        end = min(pos + stride, len(row))
        room = max_len - 1 - (end - pos)
        windows.append((row[:1] + row[max(1, pos - room):pos], row[pos:end]))
        pos = end
    return windows


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator: the likelihood functions draw on it and move the numbers, so results match across devices."""
    return torch.Generator().manual_seed(seed)


@dataclass
class Generation:
    """What :meth:`Paradigm.generate` returns for one prompt.

    tokens: the answer's ids, cut before the first stop token (eos / ``<|im_end|>``).
    produced: positions the decoder produced (AR: sampled tokens incl. a final stop; diffusion: the whole canvas).
    forwards: model calls, prefill and cache writes included. first_token_seconds: AR prefill + first sample, or
    the first denoising round. extra: paradigm-specific JSON-ready fields (e.g. ``steps_per_block``).
    trace: the canvas after every step (diffusion with ``record_trace``), each (G,) long on the CPU.
    """

    tokens: list[int]
    produced: int
    forwards: int
    first_token_seconds: float
    seconds: float
    extra: dict = field(default_factory=dict)
    trace: list[torch.Tensor] = field(default_factory=list)
    stopped_early: bool = False


class Paradigm:
    """Scoring and generation with one trained backbone. Subclasses implement every method below.

    Args:
        model: The backbone (``nanollada.model.Transformer``) in eval mode.
        tokenizer: Its tokenizer (special ids, chat template).
        is_chat: The checkpoint was SFT-trained, so prompts get the chat template by default.
        config: The checkpoint's ``paradigm_config`` (what inference needs beyond the backbone, e.g. block size).
    """

    name: ClassVar[str] = "base"
    exact_likelihood: ClassVar[bool] = True  # False: likelihoods are bounds / Monte-Carlo estimates
    supports_trace: ClassVar[bool] = False  # a denoising canvas to show step by step
    supports_editing: ClassVar[bool] = False  # the decoder reads ``editing`` (LLaDA 2.1 token editing)
    absolute_blocks: ClassVar[bool] = False  # decode blocks sit at absolute positions (multiples of B)

    def __init__(self, model, tokenizer, is_chat: bool = False, config: dict | None = None):
        self.model, self.tokenizer, self.is_chat = model, tokenizer, is_chat
        self.config = dict(config or {})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ scoring
    def sequence_nll(self, rows: list[list[int]], s: ScoringSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL in nats of every row's tokens after its first (bos): (nll (N,) float64, scored tokens (N,) long).
        Exact, or an upper bound (see ``estimate``)."""
        raise NotImplementedError

    def pair_logprobs(self, first: list[list[int]], second: list[list[int]],
                      s: ScoringSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihood scores of two aligned lists of bos-first sequences (minimal pairs), (N,) float64 each.
        Estimators with noise score item i of both lists on the same draws."""
        nll, _ = self.sequence_nll(first + second, s)
        return -nll[: len(first)], -nll[len(first):]

    def conditional_logprob(self, contexts: list[list[int]], targets: list[list[int]], s: ScoringSettings,
                            groups: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(target | context) per pair: (logprob (N,) float64, target tokens (N,) long). ``groups`` gives the
        item each pair belongs to (the choices of one multiple-choice item); estimators with noise may share their
        draws within a group."""
        raise NotImplementedError

    def greedy_continuations(self, prompts: list[list[int]], lengths: list[int], s: ScoringSettings) -> list[list[int]]:
        """Exactly ``lengths[i]`` greedily decoded tokens after every prompt (no early stop), batched."""
        raise NotImplementedError

    def rolling_nll(self, rows: list[list[int]], s: ScoringSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL in nats of every row's tokens after its first (bos), however long the row: (nll (N,), tokens (N,)).

        A row that fits ``max_seq_len`` is scored whole by :meth:`sequence_nll` (so short rows get exactly its
        numbers); a longer one is scored in the windows of :func:`rolling_windows`: its first ``max_seq_len``
        tokens by :meth:`sequence_nll`, then ``s.stride`` new tokens per window by :meth:`conditional_logprob`, each
        window seeing bos and the tokens just before it. Every token is scored once. Exact for exact paradigms (with
        at most ``max_seq_len - 1`` tokens of context), a bound where ``sequence_nll`` / ``conditional_logprob``
        are bounds."""
        max_len = self.model.cfg.max_seq_len
        nll, n = self.sequence_nll([r[:max_len] for r in rows], s)
        nll, n = nll.clone(), n.clone()
        ctxs, tgts, owner = [], [], []
        for i, r in enumerate(rows):
            for c, t in rolling_windows(r, max_len, s.stride)[1:]:
                ctxs.append(c)
                tgts.append(t)
                owner.append(i)
        if ctxs:
            lp, cnt = self.conditional_logprob(ctxs, tgts, s)
            nll.index_add_(0, torch.tensor(owner), -lp.to(nll.dtype))
            n.index_add_(0, torch.tensor(owner), cnt.to(n.dtype))
        return nll, n

    def estimate(self, family: str, s: ScoringSettings) -> str:
        """How ``family``'s numbers were obtained: ``exact`` or a named estimator with its sample count."""
        return "exact"

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids: list[int], settings, *, record_trace: bool = False,
                 on_step: Callable[[list[int]], bool | None] | None = None) -> Generation:
        """Decode an answer after ``prompt_ids`` (already rendered, bos first) with a ``GenerationSettings``.

        ``on_step(tokens)`` is called as the answer grows (AR: after every token with the answer so far; diffusion:
        after every step with the canvas so far, masks as ``tokenizer.mask_id``); a true return value stops it.
        ``settings`` arrive resolved: every subclass's ``generate`` is wrapped (``__init_subclass__``) to fill the
        fields left to the paradigm's default from :meth:`default_generation` first."""
        raise NotImplementedError

    def decode(self, prompts: list[list[int]], settings, *, stop: bool = True):
        """A batch of equal-length prompts decoded at once with resolved ``settings`` (``GenerationSettings.resolve``
        with :meth:`default_generation`): an object with ``generated`` (B rows of new tokens), ``forwards`` and
        ``seconds``. ``stop=False`` ignores eos and the stop rules so every row fills its canvas: the throughput
        benchmarks' batch-B decoding. :meth:`generate` is the one-prompt, text-producing path."""
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        gen = cls.__dict__.get("generate")
        if gen is not None and not getattr(gen, "resolves_settings", False):
            @functools.wraps(gen)
            def generate(self, prompt_ids, settings, **kw):
                return gen(self, prompt_ids, settings.resolve(self.default_generation()), **kw)
            generate.resolves_settings = True
            cls.generate = generate

    def default_generation(self) -> dict:
        """Decoding defaults of this paradigm: a value for every ``GenerationSettings`` field that a user may leave
        None ("the paradigm's default", ``generate.PARADIGM_DEFAULT_FIELDS``), chosen to read like text. The base
        values are neutral (greedy, nothing extra); a paradigm overrides the ones it cares about."""
        return {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "strategy": "low_confidence",
                "use_prefix_cache": False, "block_length": 32, "threshold": 0.9}

    def decoding_key(self, settings) -> str:
        """A key that two ``GenerationSettings`` share exactly when this paradigm decodes them identically (a
        sweep runs each key once). Default: every field counts; paradigms narrow it to the fields they read."""
        return json.dumps(asdict(settings), sort_keys=True, default=str)

    def comparison_runs(self, settings, strategies: list[str]) -> list[tuple[str, object]]:
        """(run label, settings) pairs that ``compare`` runs for this model (one per decoding strategy that applies)."""
        return [(self.name, settings)]

    # ------------------------------------------------------------------ helpers for subclasses
    def stop_ids(self) -> set[int]:
        return {self.tokenizer.eos_id, self.tokenizer.im_end_id}

    def cut_at_stop(self, ids: list[int]) -> list[int]:
        stops = self.stop_ids()
        for i, t in enumerate(ids):
            if t in stops:
                return ids[:i]
        return ids

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @staticmethod
    def clock() -> float:
        return time.perf_counter()
