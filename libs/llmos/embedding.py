"""Sentence embeddings from the exported MiniLM ONNX encoder: tokenize, encode, pool.

The one implementation of "text → vector" on the platform. The inference service schedules
calls to it (dynamic batching); offline tools (classifier training, evaluation) use it directly
so they embed exactly as the service does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from llmos.models.pooling import PoolingConfig, pool


class EmbeddingModel:
    def __init__(self, session: ort.InferenceSession, tokenizer: Tokenizer, pooling: PoolingConfig) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self.pooling = pooling
        self._input_names = {node.name for node in session.get_inputs()}
        tokenizer.enable_truncation(max_length=pooling.max_seq_length)
        tokenizer.enable_padding()

    @classmethod
    def from_dir(cls, folder: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0) -> EmbeddingModel:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=list(providers))
        return cls(session, Tokenizer.from_file(str(folder / "tokenizer.json")), PoolingConfig.load(folder))

    @property
    def dimension(self) -> int:
        return self.pooling.dimension

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(encoding.ids) for encoding in self._tokenizer.encode_batch(list(texts))]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dimension) float32 vectors, in the order given; one padded batch."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(list(texts))
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        feeds = {name: value for name, value in feeds.items() if name in self._input_names}
        (last_hidden_state,) = self._session.run(["last_hidden_state"], feeds)
        return pool(last_hidden_state, feeds["attention_mask"], self.pooling)

    def embed_sorted(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed many texts in batches of similar length (less padding), returned in input order."""
        order = np.argsort([len(text) for text in texts], kind="stable")
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            indices = order[start:start + batch_size]
            vectors[indices] = self.embed([texts[i] for i in indices])
        return vectors
