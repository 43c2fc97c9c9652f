"""Data: JSONL readers, token caches, paradigm-specific collate functions and the LightningDataModule."""

from nanollada.data.collate import ARCollate, DiffusionCollate
from nanollada.data.datamodule import LMDataModule

__all__ = ["ARCollate", "DiffusionCollate", "LMDataModule"]
