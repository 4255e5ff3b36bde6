"""Typed calls of the inference service: embeddings, streamed generation, the served models."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import numpy as np

from llmos.clients.base import ServiceClient
from llmos.v1 import common_pb2, inference_pb2, inference_pb2_grpc


class InferenceClient(ServiceClient[inference_pb2_grpc.InferenceServiceStub]):
    service = "inference"
    stub_type = inference_pb2_grpc.InferenceServiceStub

    async def embed(
        self, texts: Sequence[str], timeout_s: float | None, tenant: str = "",
        priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_INTERACTIVE, model: str = "",
    ) -> np.ndarray:
        """One float32 row per text, in order (L2-normalized)."""
        response = await self.embed_response(texts, timeout_s=timeout_s, tenant=tenant, priority=priority, model=model)
        return np.array([list(embedding.values) for embedding in response.embeddings], dtype=np.float32)

    async def embed_response(
        self, texts: Sequence[str], *, timeout_s: float | None = None, tenant: str = "",
        priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_INTERACTIVE, model: str = "",
    ) -> inference_pb2.EmbedResponse:
        """The embeddings with the model that made them, their size and the tokens read."""
        request = inference_pb2.EmbedRequest(texts=list(texts), priority=priority, tenant=tenant, model=model)
        return await self._unary(self._stub.Embed, request, timeout_s)

    async def generate(
        self, request: inference_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Every message of a generation: text deltas with their token ids, the last one with
        the finish reason and usage."""
        async for response in self._stream(self._stub.Generate, request, timeout_s):
            yield response

    async def generate_stream(
        self, messages: Sequence[tuple[str, str]], max_new_tokens: int, timeout_s: float | None,
        priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_INTERACTIVE,
    ) -> AsyncGenerator[str, None]:
        """The answer to a chat of (role, content) messages, as its text deltas arrive."""
        request = inference_pb2.GenerateRequest(
            messages=chat_messages(messages),
            sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens),
            priority=priority,
        )
        async for response in self.generate(request, timeout_s=timeout_s):
            if response.delta:
                yield response.delta

    async def models(self, *, timeout_s: float | None = None) -> list[inference_pb2.ModelInfo]:
        """The generation and embedding models the service runs."""
        response = await self._unary(self._stub.ListModels, inference_pb2.ListModelsRequest(), timeout_s)
        return list(response.models)


def chat_messages(messages: Sequence[tuple[str, str]]) -> inference_pb2.ChatMessages:
    """(role, content) pairs as a GenerateRequest's chat."""
    return inference_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=role, content=content) for role, content in messages])
