"""What the dialogue core needs from the rest of the platform, and what provides it.

The core depends on these small interfaces only, so the same turn runs against the services over
gRPC (`llmos.clients`: InferenceClient embeds, TokenizerClient counts; the adapters below fit the
other two) or against in-process models (tests, the in-process benchmark reference).
Every call carries a timeout within the request's deadline; a failed or late call becomes the
platform error with the same meaning (UNAVAILABLE, DEADLINE_EXCEEDED, ...), named after the
service that failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from llmos.clients import InferenceClient, RetrievalClient
from llmos.embedding import EmbeddingModel
from llmos.tokenization import ModelTokenizer
from llmos.v1 import common_pb2, retrieval_pb2


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
    # Abstractive summaries' generation (many long prompts), below chat in the inference
    # scheduler's order; None: `generator`.
    summary_generator: Generator | None = None


class GrpcRetriever:
    """The retrieval service's hits as the core's passages."""

    def __init__(self, client: RetrievalClient) -> None:
        self._client = client

    async def search(
        self, tenant: str, query: str, top_k: int, timeout_s: float, vector: Sequence[float] = ()
    ) -> list[Passage]:
        # Hybrid ranking finds the passages; their dense scores (cosine) say how well they match,
        # which rank-fused scores cannot.
        hits = await self._client.search(tenant, query, top_k, timeout_s, retrieval_pb2.SEARCH_MODE_HYBRID, vector)
        return [Passage(hit.chunk.document_id, hit.chunk.title, hit.chunk.chunk_id, hit.chunk.text, hit.dense_score) for hit in hits]

    async def document(self, tenant: str, document_id: str, timeout_s: float) -> tuple[str, str]:
        return await self._client.document(tenant, document_id, timeout_s)


class GrpcGenerator:
    """The inference service's streamed generation, as the core's Generator."""

    def __init__(self, client: InferenceClient, priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_INTERACTIVE) -> None:
        self._client = client
        self._priority = priority

    def stream(self, messages: Sequence[tuple[str, str]], max_new_tokens: int, timeout_s: float) -> AsyncGenerator[str, None]:
        return self._client.generate_stream(messages, max_new_tokens, timeout_s, self._priority)


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
