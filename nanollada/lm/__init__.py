"""LightningModules, one per paradigm, over the shared backbone."""

from nanollada.lm.ar import ARLM
from nanollada.lm.diffusion import MaskedDiffusionLM
from nanollada.lm.base import LanguageModel, LoadedModel, load_checkpoint

__all__ = ["ARLM", "MaskedDiffusionLM", "LanguageModel", "LoadedModel", "load_checkpoint"]
