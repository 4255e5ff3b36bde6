"""Typed calls of the inference service: embeddings and streamed generation."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import grpc
import numpy as np

from llmos.clients.base import Metadata, ServiceClient
from llmos.v1 import common_pb2, inference_pb2, inference_pb2_grpc


class InferenceClient(ServiceClient):
    service = "inference"

    def __init__(self, channel: grpc.aio.Channel, metadata: Metadata = ()) -> None:
        super().__init__(channel, metadata)
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)

    async def embed(
        self, texts: Sequence[str], timeout_s: float | None, tenant: str = "",
        priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_INTERACTIVE,
    ) -> np.ndarray:
        """One float32 row per text, in order."""
        request = inference_pb2.EmbedRequest(texts=list(texts), priority=priority, tenant=tenant)
        response = await self._unary(self._stub.Embed, request, timeout_s)
        return np.array([list(embedding.values) for embedding in response.embeddings], dtype=np.float32)

    async def generate_stream(
        self, messages: Sequence[tuple[str, str]], max_new_tokens: int, timeout_s: float | None,
        priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_INTERACTIVE,
    ) -> AsyncGenerator[str, None]:
        """The answer to a chat of (role, content) messages, as its text deltas arrive."""
        request = inference_pb2.GenerateRequest(
            messages=inference_pb2.ChatMessages(
                messages=[common_pb2.ChatMessage(role=role, content=content) for role, content in messages]
            ),
            sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens),
            priority=priority,
        )
        async for response in self._stream(self._stub.Generate, request, timeout_s):
            if response.delta:
                yield response.delta
