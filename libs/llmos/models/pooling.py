"""Sentence-embedding pooling, done at serving time on the ONNX model's last_hidden_state.

The exported encoder stops at last_hidden_state; `pooling.json` next to it records how the
checkpoint's sentence-transformers config turns token vectors into one sentence vector.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

POOLING_NAME = "pooling.json"
MEAN = "mean"


@dataclass(frozen=True)
class PoolingConfig:
    mode: str
    normalize: bool
    max_seq_length: int
    dimension: int

    def save(self, folder: Path) -> None:
        (folder / POOLING_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> PoolingConfig:
        return cls(**json.loads((folder / POOLING_NAME).read_text(encoding="utf-8")))


def pool(last_hidden_state: np.ndarray, attention_mask: np.ndarray, config: PoolingConfig) -> np.ndarray:
    """(batch, seq, dim) token vectors -> (batch, dim) float32 sentence vectors."""
    if config.mode != MEAN:
        raise ValueError(f"pooling mode {config.mode!r} is not supported (only {MEAN!r})")
    mask = attention_mask.astype(np.float32)[:, :, None]
    summed = (last_hidden_state.astype(np.float32) * mask).sum(axis=1)
    vectors = summed / np.clip(mask.sum(axis=1), 1e-9, None)
    if config.normalize:
        vectors /= np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    return vectors
