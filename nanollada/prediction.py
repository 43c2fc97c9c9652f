"""``nanollada predict`` through LightningCLI: prompts in, one JSON line per prompt out, in input order.

- :func:`read_prompts`: prompts from a ``.txt`` file (one per line) or a ``.jsonl`` file (``{"prompt": ...}``), with
  ``file:line`` errors; shared by the quick form (``nanollada predict --ckpt C --prompt ...``).
- :class:`PromptDataset`: rank r of W holds prompts r, r + W, ... (the CLI turns Lightning's distributed sampler
  off, so the data module shards itself), each item ``{"index": i, "prompt": text}``.
- :class:`JSONLPredictionWriter`: a ``BasePredictionWriter`` that appends each rank's records to a part file as
  batches finish, then (rank 0, after a barrier) merges the parts by prompt index into ``output`` atomically.

The records themselves come from ``LanguageModel.predict_step`` -> ``generate.generate_text``, the same code as the
quick form.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import Dataset


def _prompt_field(record: dict) -> str:
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError("expected a JSON object with a string 'prompt' field")
    return prompt


def _text_lines(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file; ValueError ``path:line: not valid UTF-8`` on a bad line."""
    out = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if line.strip():
                out.append(line)
    return out


def read_prompts(prompts: list[str], path: str | None) -> list[str]:
    """Prompts from the command line and/or a file: ``.jsonl``/``.jsonl.gz`` records ``{"prompt": ...}`` (through
    the project's one JSONL reader) or a text file, one prompt per non-blank line. ValueError naming the file and
    line for bad input."""
    from nanollada.data.records import read_jsonl
    out = list(prompts)
    if path:
        try:
            if str(path).endswith((".jsonl", ".jsonl.gz")):
                out.extend(prompt for _, prompt in read_jsonl(path, parse=_prompt_field))
            else:
                out.extend(_text_lines(path))
        except FileNotFoundError:
            raise ValueError(f"prompts file not found: {path}") from None
    if not out:
        raise ValueError("no prompts: give --prompt TEXT or --prompts_file FILE")
    for i, p in enumerate(out):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i + 1} is empty")
    return out


class PromptDataset(Dataset):
    """This rank's share of the prompts of a file: items ``{"index": i, "prompt": str}``, i the line order."""

    def __init__(self, path: str, rank: int = 0, world_size: int = 1):
        self.prompts = read_prompts([], path)
        self.index = list(range(rank, len(self.prompts), world_size))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return {"index": self.index[i], "prompt": self.prompts[self.index[i]]}


def collate_prompts(items: list[dict]) -> dict:
    return {"index": [it["index"] for it in items], "prompt": [it["prompt"] for it in items]}


class JSONLPredictionWriter(BasePredictionWriter):
    """Write ``predict_step``'s records (lists of dicts with an ``index``) to one JSONL file in prompt order.

    Args:
        output: The JSONL file to write (its directory is created).
    """

    def __init__(self, output: str):
        super().__init__(write_interval="batch")
        self.output = Path(output)

    def _part(self, rank: int) -> Path:
        return self.output.with_name(f".{self.output.name}.rank{rank}.part")

    def on_predict_start(self, trainer, pl_module) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._part(trainer.global_rank).write_text("", encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        with open(self._part(trainer.global_rank), "a", encoding="utf-8") as fh:
            for rec in prediction:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            records = []
            for r in range(trainer.world_size):
                part = self._part(r)
                records += [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines()]
                part.unlink()
            records.sort(key=lambda rec: rec["index"])
            tmp = self.output.with_name(f".{self.output.name}.tmp")
            tmp.write_text("".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records), encoding="utf-8")
            os.replace(tmp, self.output)
            print(f"[nanollada] wrote {len(records)} records to {self.output}")
        trainer.strategy.barrier()
