"""Query embeddings from the inference service (`InferenceService.Embed`), so queries and
chunks are embedded by the same model, scheduled with the same priorities."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llmos.clients import InferenceClient
from llmos.errors import Unavailable


class InferenceEmbedder:
    """Query vectors of the index's dimensions; another shape means a different model answered."""

    def __init__(self, client: InferenceClient, dimensions: int, timeout_s: float) -> None:
        self._client = client
        self._dimensions = dimensions
        self._timeout_s = timeout_s

    async def embed(self, texts: Sequence[str], tenant: str) -> np.ndarray:
        vectors = await self._client.embed(texts, self._timeout_s, tenant=tenant)
        if vectors.shape != (len(texts), self._dimensions):
            raise Unavailable(f"inference returned embeddings of shape {vectors.shape}; expected {(len(texts), self._dimensions)}")
        return vectors
