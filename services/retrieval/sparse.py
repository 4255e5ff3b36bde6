"""BM25 term weights for the sparse vectors, computed in-process.

Documents get BM25's saturated, length-normalized term frequencies (k1, b, an expected average
length); queries get 1.0 per distinct term. Qdrant multiplies by IDF at query time, so the dot
product is the BM25 score. Tokens are lowercased, English stop words dropped and Snowball
stemmed (qdrant-edge's BM25 model, the same as Qdrant server's `Bm25` inference), and hashed to
stable 32-bit term ids.
"""

from __future__ import annotations

import qdrant_edge as qe

from services.retrieval.index import SparseVector


class Bm25Encoder:
    def __init__(self, avg_len: float, k1: float = 1.2, b: float = 0.75) -> None:
        self._model = qe.Bm25(qe.Bm25Config(k=k1, b=b, avg_len=avg_len, language="english"))

    def document(self, text: str) -> SparseVector:
        vector = self._model.embed_document(text)
        return SparseVector(list(vector.indices), list(vector.values))

    def query(self, text: str) -> SparseVector:
        vector = self._model.embed_query(text)
        return SparseVector(list(vector.indices), list(vector.values))
