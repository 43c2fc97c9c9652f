"""Loading nanollada checkpoints for inference, with torch, the backbone and the tokenizer only (no Lightning).

Every load is ``torch.load(weights_only=True)``: a checkpoint can never run code. ``LoadedModel`` is what
``predict``, ``compare``, ``eval`` and ``export`` work with, whether it came from a ``.ckpt`` or an export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanollada.model import ModelConfig, Transformer
from nanollada.tokenizer import CHAT_KINDS, Tokenizer


def backbone_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone tensors of a LightningModule state dict ("model." prefix removed)."""
    return {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}


def read_checkpoint(path: str) -> dict:
    """``torch.load(weights_only=True)`` of a nanollada checkpoint, with clear errors for other files."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as e:  # unpickling errors have many types
        raise ValueError(f"{path} is not a loadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or "nanollada" not in payload or "state_dict" not in payload:
        raise ValueError(f"{path} is not a nanollada checkpoint (no 'nanollada' entry)")
    return payload


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint for inference: backbone in eval mode plus its tokenizer."""

    model: Transformer
    tokenizer: Tokenizer
    paradigm: str
    path: str
    is_chat: bool = False
    metadata: dict = field(default_factory=dict)  # e.g. an export's config.json
    paradigm_config: dict = field(default_factory=dict)  # e.g. block diffusion's block size

    @property
    def interface(self):
        """The checkpoint's ``nanollada.paradigms.Paradigm`` (scoring and generation), from the registry."""
        if getattr(self, "_interface", None) is None:
            from nanollada.paradigms import paradigm_class
            self._interface = paradigm_class(self.paradigm)(self.model, self.tokenizer, is_chat=self.is_chat,
                                                            config=self.paradigm_config)
        return self._interface


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the backbone and tokenizer of a nanollada checkpoint (no Lightning needed)."""
    payload = read_checkpoint(path)
    meta = payload["nanollada"]
    tokenizer = Tokenizer(model_bytes=bytes(meta["tokenizer_model"].numpy().tobytes()))
    model = Transformer(ModelConfig.from_dict(meta["model_config"]))
    model.load_state_dict(backbone_state(payload["state_dict"]))
    return LoadedModel(model.to(device).eval(), tokenizer, meta["paradigm"], str(path),
                       is_chat=meta.get("data_kind") in CHAT_KINDS,
                       paradigm_config=dict(meta.get("paradigm_config", {})))
