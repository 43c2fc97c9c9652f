"""``nanollada merge``: average the weights of several checkpoints into one (LLaDA 2.0 §4.3's top-k merge, WSM).

The k best checkpoints by validation perplexity come from a ``ModelCheckpoint(monitor="val/ppl", mode="min",
save_top_k=k)`` callback (the block-diffusion conversion configs keep the best 3 under ``checkpoints/best``); this
averages their weights in float32 and casts each tensor back to its dtype. The inputs must share the paradigm, the
backbone config and the tokenizer. The output is a normal nanollada checkpoint for ``predict``, ``eval``,
``export``, ``validate --ckpt_path`` and ``init_from`` (optimizer and scheduler states are dropped: it starts a new
run, it does not resume one), written atomically, with ``nanollada.merged_from`` listing its sources.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nanollada.loading import read_checkpoint

DROPPED = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def merge_checkpoints(paths: list[str], output: str) -> dict:
    """Average ``paths``' state dicts into ``output``; returns the merged payload's ``nanollada`` entry."""
    if len(paths) < 2:
        raise ValueError(f"merge needs at least two checkpoints, got {len(paths)}")
    payloads = [read_checkpoint(p) for p in paths]
    first = payloads[0]["nanollada"]
    for p, payload in zip(paths[1:], payloads[1:]):
        meta = payload["nanollada"]
        for key in ("paradigm", "model_config", "tokenizer_fingerprint"):
            if meta.get(key) != first.get(key):
                raise ValueError(f"{p} differs from {paths[0]} in {key} ({meta.get(key)!r} vs {first.get(key)!r}); "
                                 "only checkpoints of one run can be merged")
        if payload["state_dict"].keys() != payloads[0]["state_dict"].keys():
            raise ValueError(f"{p} holds other tensors than {paths[0]}")
    merged = {}
    for name, ref in payloads[0]["state_dict"].items():
        if ref.is_floating_point():
            merged[name] = (sum(pl["state_dict"][name].float() for pl in payloads) / len(payloads)).to(ref.dtype)
        else:
            merged[name] = ref.clone()
    out = {k: v for k, v in payloads[0].items() if k not in DROPPED}
    out["state_dict"] = merged
    out["nanollada"] = {**first, "merged_from": [str(p) for p in paths]}
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    torch.save(out, tmp)
    os.replace(tmp, target)
    return out["nanollada"]
