"""What the dialogue core needs from the rest of the platform, and the gRPC clients that provide it.

The core depends on these small interfaces only, so the same turn runs against the services over
gRPC (the service) or against in-process models (tests, the in-process benchmark reference).
Every call carries a deadline; a failed or late call becomes the platform error with the same
meaning (UNAVAILABLE, DEADLINE_EXCEEDED, ...), named after the service that failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np

from llmos.embedding import EmbeddingModel
from llmos.errors import DeadlineExceeded
from llmos.grpcutil.status import error_from_rpc
from llmos.tokenization import ModelTokenizer
from llmos.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)


@dataclass(frozen=True)
class Passage:
    document_id: str
    title: str
    chunk_id: str
    text: str
    score: float  # cosine similarity to the query


class Embedder(Protocol):
    async def embed(self, texts: Sequence[str], timeout_s: float) -> np.ndarray: ...


class Retriever(Protocol):
    async def search(
        self, tenant: str, query: str, top_k: int, timeout_s: float, vector: Sequence[float] = ()
    ) -> list[Passage]:
        """Hybrid search; `vector` is the query's embedding when the caller already has it."""
        ...

    async def document(self, tenant: str, document_id: str, timeout_s: float) -> tuple[str, str]:
        """(title, full text) of an indexed document."""
        ...


class Generator(Protocol):
    def stream(self, messages: Sequence[tuple[str, str]], max_new_tokens: int, timeout_s: float) -> AsyncGenerator[str, None]: ...


class TokenCounter(Protocol):
    async def count(self, texts: Sequence[str], timeout_s: float) -> list[int]: ...


@dataclass(frozen=True)
class Backends:
    embedder: Embedder
    retriever: Retriever
    generator: Generator
    tokens: TokenCounter


class GrpcEmbedder:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)

    async def embed(self, texts: Sequence[str], timeout_s: float) -> np.ndarray:
        try:
            response = await self._stub.Embed(
                inference_pb2.EmbedRequest(texts=list(texts), priority=common_pb2.PRIORITY_INTERACTIVE), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, "inference") from None
        return np.array([embedding.values for embedding in response.embeddings], dtype=np.float32)


class GrpcRetriever:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)

    async def search(
        self, tenant: str, query: str, top_k: int, timeout_s: float, vector: Sequence[float] = ()
    ) -> list[Passage]:
        # Hybrid ranking finds the passages; their dense scores (cosine) say how well they match,
        # which rank-fused scores cannot.
        request = retrieval_pb2.SearchRequest(
            tenant=tenant, query=query, top_k=top_k, mode=retrieval_pb2.SEARCH_MODE_HYBRID, query_vector=list(vector)
        )
        try:
            response = await self._stub.Search(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, "retrieval") from None
        return [
            Passage(hit.chunk.document_id, hit.chunk.title, hit.chunk.chunk_id, hit.chunk.text, hit.dense_score)
            for hit in response.hits
        ]

    async def document(self, tenant: str, document_id: str, timeout_s: float) -> tuple[str, str]:
        chunks: list[common_pb2.Chunk] = []
        token = ""
        title = ""
        try:
            while True:
                response = await self._stub.GetDocument(
                    retrieval_pb2.GetDocumentRequest(
                        tenant=tenant, document_id=document_id, page=common_pb2.PageRequest(page_size=100, page_token=token)
                    ),
                    timeout=timeout_s,
                )
                title = response.title
                chunks.extend(response.chunks)
                token = response.page.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, "retrieval") from None
        return title, stitch(chunks)


def stitch(chunks: Sequence[common_pb2.Chunk]) -> str:
    """The document text from its overlapping chunks, using their character offsets."""
    text = ""
    for chunk in sorted(chunks, key=lambda chunk: chunk.index):
        overlap = max(0, len(text) - chunk.start_offset) if text else 0
        text += chunk.text[overlap:]
    return text


class GrpcGenerator:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)

    async def stream(self, messages: Sequence[tuple[str, str]], max_new_tokens: int, timeout_s: float) -> AsyncGenerator[str, None]:
        request = inference_pb2.GenerateRequest(
            messages=inference_pb2.ChatMessages(
                messages=[common_pb2.ChatMessage(role=role, content=content) for role, content in messages]
            ),
            sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens),
            priority=common_pb2.PRIORITY_INTERACTIVE,
        )
        call = self._stub.Generate(request, timeout=timeout_s)
        try:
            async for response in call:
                if response.delta:
                    yield response.delta
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, "inference") from None
        finally:
            # A reader that stops early (a looping answer, a barge-in) frees the inference slot at once.
            call.cancel()


class GrpcTokenCounter:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)

    async def count(self, texts: Sequence[str], timeout_s: float) -> list[int]:
        try:
            response = await self._stub.CountTokens(tokenizer_pb2.CountTokensRequest(texts=list(texts)), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, "tokenizer") from None
        return list(response.counts)


class LocalEmbedder:
    """MiniLM in this process: trains the intent classifier, and serves offline tools and tests."""

    def __init__(self, model: EmbeddingModel) -> None:
        self._model = model

    @classmethod
    def from_dir(cls, folder: Path, threads: int = 0) -> LocalEmbedder:
        return cls(EmbeddingModel.from_dir(folder, threads=threads))

    async def embed(self, texts: Sequence[str], timeout_s: float = 0.0) -> np.ndarray:
        return await asyncio.to_thread(self._model.embed_sorted, list(texts))


class LocalTokenCounter:
    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self._tokenizer = tokenizer

    async def count(self, texts: Sequence[str], timeout_s: float = 0.0) -> list[int]:
        return self._tokenizer.count(texts)


def remaining(deadline: float | None, default_s: float) -> float:
    """Seconds left before `deadline` (event-loop time), or `default_s` when there is none."""
    if deadline is None:
        return default_s
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise DeadlineExceeded("the request's deadline passed before the turn was complete")
    return left
