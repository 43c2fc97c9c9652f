"""nanollada: small autoregressive and masked-diffusion (LLaDA-style) language models on one shared backbone."""

from nanollada.data import LMDataModule
from nanollada.lm import ARLM, MaskedDiffusionLM, load_checkpoint
from nanollada.model import ModelConfig, Transformer
from nanollada.tokenizer import Tokenizer

__all__ = ["ARLM", "LMDataModule", "MaskedDiffusionLM", "ModelConfig", "Tokenizer", "Transformer", "load_checkpoint"]
__version__ = "0.2.0"
