"""Export a nanollada checkpoint to a Lightning-free directory and load it back.

``export_checkpoint(ckpt, out_dir)`` writes three files:

- ``model.safetensors``: the backbone weights (``Transformer.state_dict()`` names). The tied input/output embedding
  is stored once, as ``embed.weight``; ``lm_head.weight`` is left out because safetensors refuses tensors that share
  memory, and ``config.json`` records ``"tied_embeddings": true`` so the loader re-ties it.
- ``config.json``: the model config, paradigm, data kind (``pretrain`` / ``sft``, i.e. whether prompts get the chat
  template), the tokenizer's special ids and fingerprint, and where the weights came from.
- ``tokenizer.model``: the SentencePiece model embedded in the checkpoint.

``load_exported(dir)`` rebuilds the model with only torch, safetensors and sentencepiece (plus this package's
``nanollada.model`` and ``nanollada.tokenizer``, which need nothing else); no Lightning code runs and no pickle is
read. The returned object has the fields of ``nanollada.loading.LoadedModel``, so ``generate_text`` and ``compare``
accept it.

    nanollada export --ckpt logs/tiny_ar_pretrain/checkpoints/last.ckpt --output exported/tiny_ar
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from nanollada.loading import LoadedModel, read_checkpoint
from nanollada.tokenizer import CHAT_KINDS

FORMAT = "nanollada-export"
FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.model"
TIED = ("embed.weight", "lm_head.weight")  # (kept, dropped)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_checkpoint(ckpt: str | os.PathLike, output: str | os.PathLike, dtype: str | None = None) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``tokenizer.model`` for checkpoint ``ckpt`` into ``output``.

    dtype: ``float32``, ``bfloat16`` or ``float16`` to cast the floating-point weights; None keeps the stored dtype.
    Returns the output directory.
    """
    from safetensors.torch import save_file

    from nanollada.model import ModelConfig
    from nanollada.tokenizer import Tokenizer

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    payload = read_checkpoint(ckpt)
    meta = payload["nanollada"]
    cfg = ModelConfig.from_dict(meta["model_config"])
    state = {k[len("model."):]: v for k, v in payload["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise ValueError(f"{ckpt} holds no backbone weights ('model.*' entries)")
    tied = TIED[0] in state and TIED[1] in state
    if tied:
        if not torch.equal(state[TIED[0]], state[TIED[1]]):
            raise ValueError(f"{ckpt}: {TIED[1]} differs from {TIED[0]}; the backbone ties them")
        del state[TIED[1]]
    tensors = {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(DTYPES[dtype])
        tensors[name] = t.contiguous().clone()  # own storage each: safetensors rejects shared or strided tensors

    tok_bytes = bytes(meta["tokenizer_model"].numpy().tobytes())
    tok = Tokenizer(model_bytes=tok_bytes)
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"{ckpt}: tokenizer vocabulary {tok.vocab_size} != model vocab_size {cfg.vocab_size}")
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "paradigm": meta["paradigm"],
        "data_kind": meta.get("data_kind", "pretrain"),
        "model_config": cfg.to_dict(),
        "paradigm_config": dict(meta.get("paradigm_config", {})),
        "tied_embeddings": tied,
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "") if dtype is None else dtype,
        "num_params": sum(t.numel() for t in tensors.values()),
        "tokenizer": {
            "file": TOKENIZER_FILE, "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint(),
            "pad_id": tok.pad_id, "unk_id": tok.unk_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "mask_id": tok.mask_id, "im_start_id": tok.im_start_id, "im_end_id": tok.im_end_id,
        },
        "source": {"checkpoint": str(ckpt), "global_step": payload.get("global_step"),
                   "epoch": payload.get("epoch")},
    }
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "nanollada": FORMAT,
                                                          "paradigm": meta["paradigm"]})
    (out / TOKENIZER_FILE).write_bytes(tok_bytes)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> LoadedModel:
    """Rebuild the backbone and tokenizer of an exported directory (no Lightning, no pickle).

    dtype: cast the weights (e.g. ``torch.float32`` for a bf16 export on CPU); None keeps the stored dtype.
    """
    from safetensors.torch import load_file

    from nanollada.model import ModelConfig, Transformer
    from nanollada.tokenizer import Tokenizer

    d = Path(path)
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE) if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d} is not an exported nanollada model: missing {', '.join(missing)}")
    config = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ValueError(f"{d / CONFIG_FILE} is not a nanollada export (format={config.get('format')!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{d} has export format {config['format_version']}; this nanollada reads <= {FORMAT_VERSION}")
    tok_bytes = (d / TOKENIZER_FILE).read_bytes()
    tok = Tokenizer(model_bytes=tok_bytes)
    tok.path = d / TOKENIZER_FILE
    expected = config["tokenizer"]
    fp = hashlib.sha1(tok_bytes).hexdigest()[:16]
    if fp != expected["fingerprint"]:
        raise ValueError(f"{d / TOKENIZER_FILE} is not the tokenizer the model was trained with "
                         f"(fingerprint {fp} != {expected['fingerprint']})")
    for key in ("pad_id", "bos_id", "eos_id", "mask_id", "im_start_id", "im_end_id"):
        if getattr(tok, key) != expected[key]:
            raise ValueError(f"{d / TOKENIZER_FILE}: {key} {getattr(tok, key)} != {expected[key]} in config.json")

    cfg = ModelConfig.from_dict(config["model_config"])
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = Transformer(cfg)
    state = load_file(str(d / WEIGHTS_FILE), device="cpu")
    if config.get("tied_embeddings", True):
        state[TIED[1]] = state[TIED[0]]
    own = set(model.state_dict())
    if set(state) != own:
        raise ValueError(f"{d / WEIGHTS_FILE} does not match the config: missing {sorted(own - set(state))}, "
                         f"unexpected {sorted(set(state) - own)}")
    model.load_state_dict(state, assign=True)  # tied names get the same tensor, so the tie survives
    if model.lm_head.weight is not model.embed.weight:
        model.lm_head.weight = model.embed.weight
    # The RoPE tables are non-persistent buffers: rebuild them for real (they were created on the meta device).
    from nanollada.model import rope_table
    cos, sin = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    if dtype is not None:
        model = model.to(dtype)
        model.rope_cos, model.rope_sin = cos, sin  # keep the tables in float32, as Transformer builds them
    model = model.to(device).eval()
    return LoadedModel(model, tok, config["paradigm"], str(d), is_chat=config.get("data_kind") in CHAT_KINDS,
                       metadata=config, paradigm_config=dict(config.get("paradigm_config", {})))
