"""Query embeddings from the inference service (`InferenceService.Embed`), so queries and
chunks are embedded by the same model, scheduled with the same priorities."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np

from llmos.errors import Unavailable
from llmos.grpcutil.status import error_from_rpc
from llmos.v1 import common_pb2, inference_pb2, inference_pb2_grpc


class InferenceEmbedder:
    def __init__(self, channel: grpc.aio.Channel, dimensions: int, timeout_s: float) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self._dimensions = dimensions
        self._timeout_s = timeout_s

    async def embed(self, texts: Sequence[str], tenant: str) -> np.ndarray:
        request = inference_pb2.EmbedRequest(texts=list(texts), priority=common_pb2.PRIORITY_INTERACTIVE, tenant=tenant)
        try:
            response = await self._stub.Embed(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, "inference") from None
        vectors = np.array([list(embedding.values) for embedding in response.embeddings], dtype=np.float32)
        if vectors.shape != (len(texts), self._dimensions):
            raise Unavailable(f"inference returned embeddings of shape {vectors.shape}; expected {(len(texts), self._dimensions)}")
        return vectors
