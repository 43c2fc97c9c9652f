"""Preference tuning with DPO for every paradigm: ``ARDPO``, ``MaskedDiffusionDPO``, ``BlockDiffusionDPO``.

DPO (Rafailov et al. 2023) trains a policy pi against a frozen reference pi_ref on pairs (x, y_w chosen, y_l
rejected)::

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

The rewards are ``beta * (log pi - log pi_ref)`` of each response; ``beta`` defaults to 0.1 (LLaDA 2.0 §5.3 and
Nano-LLaDA; MiniMind's AR ``train_dpo.py`` uses 0.15). Batches come from the ``preference`` data kind
(``data/preference.py``): rows 0..B-1 are the chosen responses, rows B..2B-1 the rejected ones, with the loss on
the response tokens only (content + ``<|im_end|>``).

- AR (``ARDPO``): exact log-likelihoods, the sum of the response tokens' log-probabilities.
- Diffusion (``MaskedDiffusionDPO``, ``BlockDiffusionDPO``): log pi is replaced by a Monte-Carlo ELBO estimate
  ``B(y|x) = -(1/K) sum_k sum_{masked i} CE_i / p_mask(t_k)`` (LLaDA eq. 5 without the length normalisation; for block
  diffusion the block ELBO of ``evaluation.block_likelihood``, LLaDA 2.0 eq. 7, as in its §5.3 DPO). The estimate's
  variance is kept low the way LLaDA 1.5's VRPO prescribes: ``dpo_samples`` = K draws per response with
  stratified times t_k = (k + u) / K (one u per response; VRPO's optimal allocation, K timesteps with one mask each),
  and **the policy and the reference scored on the same times and masks** (antithetic sampling: the noise common to
  both cancels in B_pi - B_ref). Chosen and rejected responses get independent draws (Nano-LLaDA's
  ``train_dpo_diffusion.py``). ``shared_noise: false`` draws the reference's noise independently -- only for
  measuring what the sharing buys (``benchmarks/dpo_variance.py``).

The reference is a frozen copy of the backbone (``self.reference``). At a fresh fit it is loaded from
``reference_from`` or, by default, is the policy's weights as the fit starts, i.e. the ``init_from`` checkpoint (the
SFT model). It is saved in the module's checkpoints (so ``validate``, ``test`` and a ``--ckpt_path`` resume need no
other file; inference reads only the policy's ``model.*`` tensors). Checkpoints keep the paradigm of the backbone, so
every ``nanollada`` command loads a DPO checkpoint like any other of its paradigm. Single device or DDP only (an
FSDP/DeepSpeed strategy is refused: the reference would need sharding of its own).

Logged (``train/`` per step and ``val/``, ``test/`` over the validation pairs): ``loss`` (the DPO loss; log 2 while
the policy equals the reference), ``reward_accuracy`` (share of pairs whose chosen reward is strictly higher; 0 at the
start, where every reward is 0), ``reward_margin`` (mean of the chosen minus the rejected reward), ``chosen_reward``,
``rejected_reward``; validation also logs ``likelihood_accuracy``, the share of pairs where the policy itself gives
the chosen response the higher per-token log-likelihood (what ``nanollada eval``'s preference family reports), and
``pairs``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import SumMetric

from nanollada.data.collate import IGNORE_INDEX, DiffusionCollate
from nanollada.errors import ConfigError
from nanollada.evaluation.block_likelihood import block_diffusion_logits, pad_to_blocks
from nanollada.evaluation.likelihood import Generators, uniform
from nanollada.lm.ar import ARLM
from nanollada.lm.base import LanguageModel
from nanollada.lm.block_diffusion import BlockDiffusionLM
from nanollada.lm.diffusion import MaskedDiffusionLM
from nanollada.model import Transformer
from nanollada.noise import mask_probability

EVAL_SUMS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "likelihood_accuracy",
             "pairs")


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair DPO terms from (2B,) log-likelihoods (chosen rows first): loss, rewards, margin, correct (B,)."""
    B = policy.shape[0] // 2
    chosen = beta * (policy[:B] - reference[:B])
    rejected = beta * (policy[B:] - reference[B:])
    margin = chosen - rejected
    return {"loss": -F.logsigmoid(margin), "reward_margin": margin, "chosen_reward": chosen,
            "rejected_reward": rejected, "reward_accuracy": (margin > 0).float()}


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """The mean DPO loss over the pairs and the batch means of its terms (see ``dpo_terms``)."""
    terms = dpo_terms(policy, reference, beta)
    means = {k: v.detach().mean() for k, v in terms.items()}
    return terms["loss"].mean(), means


class DPOMixin:
    """DPO training and validation on top of a paradigm's ``LanguageModel`` (put first in the bases).

    Subclasses implement ``pair_logps(batch, batch_idx, train) -> (policy (2B,), reference (2B,), tokens (2B,))``:
    the policy's log-likelihood of every row's response (with gradient when training), the reference's on the same
    terms (no gradient), and the response lengths.

    Args:
        beta: DPO's beta (the KL strength): rewards are beta * (log pi - log pi_ref).
        reference_from: Checkpoint of the frozen reference (read at a fresh fit; its tensors must match the
            backbone exactly). None = the policy's weights when the fit starts, i.e. ``init_from``'s.
        **kwargs: The paradigm module's arguments (backbone, optimizer, schedule, ``init_from``, ...).
    """

    consumes_pairs = True

    def __init__(self, beta: float = 0.1, reference_from: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if beta <= 0:
            raise ConfigError(f"beta must be > 0, got {beta}")
        self.reference = Transformer(self.config).requires_grad_(False)
        self.dpo_sums = torch.nn.ModuleDict({k: SumMetric().set_dtype(torch.float64) for k in EVAL_SUMS})

    def pair_logps(self, batch: dict, batch_idx: int, train: bool):
        raise NotImplementedError

    # ---------------------------------------------------------------- the reference
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.strategy.restore_checkpoint_after_setup:
            raise ConfigError(f"{type(self).__name__} supports one device or DDP, not "
                             f"{type(self.trainer.strategy).__name__} (its frozen reference is not sharded)")
        super().setup(stage)

    def on_fit_start(self) -> None:
        super().on_fit_start()  # loads init_from into the policy at a fresh fit
        if self._restored or self.trainer.ckpt_path:
            print(f"[nanollada] DPO reference restored from {self.trainer.ckpt_path or 'the checkpoint'}")
            return
        if self.hparams.reference_from:
            report = self.load_weights_from(self.hparams.reference_from, into=self.reference, what="reference_from")
            if report["missing"] or report["shape_mismatch"]:
                raise ConfigError(f"reference_from {self.hparams.reference_from} does not match the backbone: missing "
                                 f"{report['missing']}, shape mismatch {report['shape_mismatch']}")
        else:
            self.reference.load_state_dict(self.model.state_dict())
            print(f"[nanollada] DPO reference = the policy at the start of the fit "
                  f"({self.hparams.init_from or 'its initial weights: no init_from'})")

    # ---------------------------------------------------------------- training
    def training_loss(self, batch: dict, batch_idx: int) -> torch.Tensor:
        policy, reference, _ = self.pair_logps(batch, batch_idx, train=True)
        loss, stats = dpo_loss(policy, reference, self.hparams.beta)
        self.log_dict({f"train/{k}": v for k, v in stats.items() if k != "loss"}, on_step=True)
        return loss

    # ---------------------------------------------------------------- validation / test
    def _eval_start(self) -> None:
        self.flops_per_batch = None
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        for m in self.dpo_sums.values():
            m.reset()
            m.update(zero)  # a rank whose shard is empty still takes part in the sum

    def _eval_step(self, batch: dict, batch_idx: int) -> None:
        policy, reference, n = self.pair_logps(batch, batch_idx, train=False)
        terms = dpo_terms(policy, reference, self.hparams.beta)
        B = policy.shape[0] // 2
        per_token = policy / n.clamp(min=1)
        terms["likelihood_accuracy"] = (per_token[:B] > per_token[B:]).float()
        terms["pairs"] = torch.ones_like(terms["loss"])
        for k, v in terms.items():
            self.dpo_sums[k].update(v.double().sum())

    def _eval_end(self, prefix: str) -> None:
        sums = {k: m.compute() for k, m in self.dpo_sums.items()}  # summed over every rank's shard
        pairs = sums["pairs"].clamp(min=1)
        out = {f"{prefix}/{k}": (v / pairs).float() for k, v in sums.items() if k != "pairs"}
        out[f"{prefix}/pairs"] = sums["pairs"].float()
        self.log_dict(out, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")


def response_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over the positions whose target is not IGNORE_INDEX: logits (R, T, V) -> (R,)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none").view_as(targets)
    return -ce.sum(1)


class ARDPO(DPOMixin, ARLM):
    """DPO for the autoregressive model (MiniMind's ``train_dpo.py``): exact response log-likelihoods.

    Batches come from ``ARCollate`` on ``data.kind: preference``. Args: see ``DPOMixin`` and ``LanguageModel``.
    """

    def pair_logps(self, batch: dict, batch_idx: int, train: bool):
        ids, targets, mask = batch["input_ids"], batch["targets"], self.attention_mask(batch)
        self.flops_per_batch = self.flops_per_batch and self.flops_per_batch * 4 // 3  # + the reference forward
        policy = response_logps(self.forward_model(ids, attn_mask=mask), targets)
        with torch.no_grad():
            reference = response_logps(self.reference(ids, attn_mask=mask), targets)
        return policy, reference, (targets != IGNORE_INDEX).sum(1)


class DiffusionDPOMixin(DPOMixin):
    """DPO on Monte-Carlo ELBO estimates with VRPO's variance reduction (see the module docstring).

    Subclasses give ``rows(batch)`` (ids, eligible, doc ids, padded as their ELBO needs) and
    ``denoise_logits(model, noisy, clean, docs, batch)`` (logits (N, T, V) of the noisy rows).

    Args:
        dpo_samples: Monte-Carlo draws K per response in training (stratified times; one forward of K x 2B rows for
            the policy, one without gradient for the reference).
        shared_noise: Score the reference on the policy's times and masks (VRPO's antithetic sampling). False draws
            them independently: only for measuring the variance it removes.
        val_samples: Draws per response in validation and test.
        val_seed: Seed of the validation draws (every validation pass scores the same masks).
        noise_seed: Seed of the training draws, a function of (step, micro-batch, rank): a resumed run draws what
            an uninterrupted one would.
        beta, reference_from, **kwargs: see ``DPOMixin``.
    """

    def __init__(self, dpo_samples: int = 2, shared_noise: bool = True, val_samples: int = 8, val_seed: int = 1234,
                 noise_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if dpo_samples < 1 or val_samples < 1:
            raise ConfigError(f"dpo_samples and val_samples must be >= 1, got {dpo_samples}, {val_samples}")
        self.mask_id = self.tokenizer.mask_id

    def _generator(self, train: bool, batch: dict, batch_idx: int):
        h = self.hparams
        if not train:
            # Validation draws follow the pair: rows are the B chosen then the B rejected responses, and response
            # j of pair i is seeded by 2i + j, whatever the batching or the number of ranks.
            pairs = batch.get("row_index")
            rows = {} if pairs is None else {"row_index": torch.cat([2 * pairs, 2 * pairs + 1])}
            return self.eval_generators(rows, batch_idx, h.val_seed)
        accum, world = self.trainer.accumulate_grad_batches, max(1, self.trainer.world_size)
        seed = ((h.noise_seed * 1_000_003 + self.global_step) * accum + batch_idx % accum) * world + \
            self.global_rank
        return torch.Generator(device=self.device).manual_seed(seed)

    def draw_noise(self, ids: torch.Tensor, eligible: torch.Tensor, samples: int, g: Generators):
        """K stratified draws per row: noisy ids (K, R, T), masked (K, R, T) bool, p_mask (K, R).

        Draw k of row r masks each eligible token with probability p_mask((k + u_r) / K), u_r ~ U(0, 1)."""
        R, T = ids.shape
        u = uniform((R,), g, ids.device)
        k = torch.arange(samples, device=ids.device, dtype=u.dtype)[:, None]
        p_mask = mask_probability((k + u[None]) / samples)
        rand = torch.stack([uniform((R, T), g, ids.device) for _ in range(samples)])
        masked = (rand < p_mask[..., None]) & eligible[None]
        noisy = torch.where(masked, torch.full_like(ids, self.mask_id)[None], ids[None])
        return noisy, masked, p_mask

    def elbo_logps(self, model, ids, docs, batch, noisy, masked, p_mask) -> torch.Tensor:
        """The ELBO estimate of every row's log-likelihood, (R,): minus the mean over the K draws of
        sum_{masked} CE / p_mask."""
        K, R, T = noisy.shape
        clean = ids.repeat(K, 1)
        logits = self.denoise_logits(model, noisy.flatten(0, 1), clean, docs.repeat(K, 1), batch)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), clean.flatten(), reduction="none").view(K, R, T)
        return -((ce * masked).sum(-1) / p_mask).mean(0)

    def pair_logps(self, batch: dict, batch_idx: int, train: bool):
        h = self.hparams
        ids, eligible, docs = self.rows(batch)
        samples = h.dpo_samples if train else h.val_samples
        g = self._generator(train, batch, batch_idx)
        draws = self.draw_noise(ids, eligible, samples, g)
        if train:  # K policy forwards with gradient plus K reference forwards (a third of the cost each)
            self.flops_per_batch = int(self.model.flops_per_token(ids.shape[1] * self.input_factor) * ids.numel()
                                       * self.input_factor * samples * 4 / 3)
        policy = self.elbo_logps(self.forward_model, ids, docs, batch, *draws)
        with torch.no_grad():
            if not h.shared_noise:
                draws = self.draw_noise(ids, eligible, samples, g)
            reference = self.elbo_logps(self.reference, ids, docs, batch, *draws)
        return policy, reference, eligible.sum(1)

    input_factor = 1  # tokens fed per row token (block diffusion feeds x_t and x_0)

    def rows(self, batch: dict):
        return batch["input_ids"], batch["eligible"], batch["doc_ids"]

    def denoise_logits(self, model, noisy, clean, docs, batch) -> torch.Tensor:
        raise NotImplementedError


class MaskedDiffusionDPO(DiffusionDPOMixin, LanguageModel):
    """DPO for masked diffusion (LLaDA 1.5's VRPO): masked-diffusion ELBO estimates of the response given the prompt
    (the prompt never masked, padding neither scored nor attended). Batches come from ``DiffusionCollate`` on
    ``data.kind: preference``. Args: see ``DiffusionDPOMixin``, ``DPOMixin`` and ``LanguageModel``."""

    causal = MaskedDiffusionLM.causal
    paradigm = MaskedDiffusionLM.paradigm
    collate_cls = DiffusionCollate

    def denoise_logits(self, model, noisy, clean, docs, batch):
        return model(noisy, attn_mask=self.attention_mask({**batch, "doc_ids": docs}))


class BlockDiffusionDPO(DiffusionDPOMixin, LanguageModel):
    """DPO for block diffusion (LLaDA 2.0 §5.3): block-ELBO estimates (``x_t ⊕ x_0`` under the block mask, one time
    per response and draw) of the response given the prompt.

    Args:
        block_size: The block size of the ELBO and of decoding (use the SFT checkpoint's); rows are right-padded to
            whole blocks with tokens that are neither scored nor attended.
        dpo_samples, shared_noise, val_samples, val_seed, noise_seed, beta, reference_from, **kwargs: see
            ``DiffusionDPOMixin``, ``DPOMixin`` and ``LanguageModel``.
    """

    causal = BlockDiffusionLM.causal
    paradigm = BlockDiffusionLM.paradigm
    collate_cls = DiffusionCollate
    input_factor = 2

    def __init__(self, block_size: int = 32, **kwargs):
        super().__init__(**kwargs)
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")

    def paradigm_config(self) -> dict:
        return {"block_size": self.hparams.block_size, "editing_trained": False}

    def _block(self, length: int) -> int:
        return min(self.hparams.block_size, length)

    def rows(self, batch: dict):
        ids, eligible, docs = batch["input_ids"], batch["eligible"], batch["doc_ids"]
        return pad_to_blocks(ids, eligible, docs, self._block(ids.shape[1]), self.tokenizer.eos_id)

    def denoise_logits(self, model, noisy, clean, docs, batch):
        return block_diffusion_logits(model, noisy, clean, docs, self._block(clean.shape[1]))


# The DPO module of every paradigm, by the ``paradigm`` key its checkpoints (and its SFT checkpoints) carry.
DPO_CLASSES: dict[str, type[LanguageModel]] = {cls.paradigm: cls for cls in (ARDPO, MaskedDiffusionDPO,
                                                                                 BlockDiffusionDPO)}
