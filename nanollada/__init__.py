"""nanollada: small autoregressive and masked-diffusion (LLaDA-style) language models on one shared backbone.

Public names are imported lazily (PEP 562), so ``import nanollada.model`` or ``nanollada.export`` does not pull in
Lightning.
"""

import importlib

__version__ = "0.2.0"
_EXPORTS = {
    "ARLM": "nanollada.lm", "MaskedDiffusionLM": "nanollada.lm", "load_checkpoint": "nanollada.loading",
    "LMDataModule": "nanollada.data", "ModelConfig": "nanollada.model", "Transformer": "nanollada.model",
    "Tokenizer": "nanollada.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nanollada' has no attribute {name!r}")
