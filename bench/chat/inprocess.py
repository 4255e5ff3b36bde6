"""The chat benchmark's reference: a turn with no network hop, the dialogue core calling the
inference and retrieval cores inside this process.

The inference core is assembled exactly as the service assembles it (services.inference.app.build,
the same settings: models, threads, embed batcher, generation scheduler), with an in-memory
publisher instead of the bus. The retrieval core gets an embedded index of its own, filled with
the very chunks and vectors the platform indexed: the `llmos.chunks.embedded` messages are read
back from the stack's stream and handed to the core as its bus handler would. Search and
generation then run the same code as in the services, minus gRPC, authentication, tracing of the
hops and the bus.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

import numpy as np
from nats.js.errors import NotFoundError

from llmos.bus.codec import decode
from llmos.bus.subjects import CHUNKS_EMBEDDED, stream_for
from llmos.clients.inference import chat_messages
from llmos.clients.retrieval import stitch
from llmos.crypto import AtRest
from llmos.deadline import Deadline
from llmos.natsauth import connect_cli
from llmos.settings import PlatformSettings, load_settings
from llmos.testing import MemoryBucket, MemoryPublisher
from llmos.v1 import common_pb2, events_pb2, inference_pb2, retrieval_pb2
from services.dialogue.backends import Passage
from services.inference.app import build as build_inference
from services.inference.core import InferenceCore
from services.inference.settings import InferenceSettings
from services.retrieval.app import open_index, search_limits
from services.retrieval.core import RetrievalCore
from services.retrieval.index import SealedTextIndex
from services.retrieval.profiles import KvProfileStore
from services.retrieval.settings import RetrievalSettings
from services.retrieval.sparse import Bm25Encoder

# The benchmark's own index, beside the service's (`edge-<replica>` under the stack's home).
REPLICA = "bench-in-process"


class CoreEmbedder:
    """The dialogue's and retrieval's embeddings from the inference core (its embed batcher)."""

    def __init__(self, core: InferenceCore) -> None:
        self._core = core

    async def embed(self, texts: Sequence[str], timeout_s: float = 0.0) -> np.ndarray:
        return (await self._core.embed("", list(texts), common_pb2.PRIORITY_INTERACTIVE)).vectors


class CoreQueryEmbedder:
    """Retrieval's QueryEmbedder (texts, tenant) over the same inference core."""

    def __init__(self, embedder: CoreEmbedder) -> None:
        self._embedder = embedder

    async def embed(self, texts: Sequence[str], tenant: str) -> np.ndarray:
        return await self._embedder.embed(texts)


class CoreGenerator:
    """The dialogue's Generator over the inference core, as the service's Generate streams it."""

    def __init__(self, core: InferenceCore, tenant: str, priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_INTERACTIVE) -> None:
        self._core = core
        self._tenant = tenant
        self._priority = priority

    async def stream(self, messages: Sequence[tuple[str, str]], max_new_tokens: int, timeout_s: float) -> AsyncGenerator[str, None]:
        request = inference_pb2.GenerateRequest(
            messages=chat_messages(messages), sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens),
            priority=self._priority,
        )
        async for event in self._core.generate(request, self._tenant, Deadline.after(timeout_s) if timeout_s else None):
            if event.delta:
                yield event.delta


class CoreRetriever:
    """The dialogue's Retriever over the retrieval core, as GrpcRetriever reads the service."""

    def __init__(self, core: RetrievalCore) -> None:
        self._core = core

    async def search(self, tenant: str, query: str, top_k: int, timeout_s: float, vector: Sequence[float] = ()) -> list[Passage]:
        request = retrieval_pb2.SearchRequest(
            tenant=tenant, query=query, top_k=top_k, mode=retrieval_pb2.SEARCH_MODE_HYBRID, query_vector=list(vector)
        )
        hits = (await self._core.search(tenant, request)).hits
        return [Passage(hit.chunk.document_id, hit.chunk.title, hit.chunk.chunk_id, hit.chunk.text, hit.dense_score) for hit in hits]

    async def document(self, tenant: str, document_id: str, timeout_s: float) -> tuple[str, str]:
        chunks: list[common_pb2.Chunk] = []
        token, title = "", ""
        while True:
            page = await self._core.get_document(
                tenant, retrieval_pb2.GetDocumentRequest(tenant=tenant, document_id=document_id, page=common_pb2.PageRequest(page_token=token))
            )
            chunks.extend(page.chunks)
            title, token = page.title, page.page.next_page_token
            if not token:
                return title, stitch(chunks)


async def inference_core() -> tuple[InferenceCore, Callable[[], Awaitable[None]]]:
    """The inference service's core, built by its own factory from this environment's settings."""
    parts = await build_inference(load_settings(InferenceSettings), MemoryPublisher())  # type: ignore[arg-type]
    # The factory hands its core to the gRPC servicer only; the benchmark calls the core directly.
    core: InferenceCore = parts.grpc[0].servicer._core
    assert parts.close is not None
    return core, parts.close


def retrieval_core(embedder: CoreEmbedder) -> RetrievalCore:
    """A retrieval core like the service's (same settings, sealed text), on an embedded index of its own."""
    settings = load_settings(RetrievalSettings).model_copy(update={"retrieval_replica": REPLICA, "qdrant_url": ""})
    return RetrievalCore(
        SealedTextIndex(open_index(settings), AtRest.from_settings(settings, "chunk text in the index")),
        Bm25Encoder(settings.retrieval_bm25_avg_len),
        CoreQueryEmbedder(embedder),
        KvProfileStore(MemoryBucket(), settings.retrieval_profile_items),
        settings.retrieval_dimensions,
        search_limits(settings),
    )


async def replay_indexed_chunks(settings: PlatformSettings, core: RetrievalCore) -> int:
    """Index into `core` every `llmos.chunks.embedded` message the stack's stream holds (the chunks
    and vectors the platform indexed), as retrieval's bus handler does; how many documents."""
    connection = await connect_cli(settings)
    try:
        stream = stream_for(CHUNKS_EMBEDDED).name
        jetstream = connection.jetstream()
        state = (await jetstream.stream_info(stream)).state
        documents = 0
        for sequence in range(state.first_seq, state.last_seq + 1):
            try:
                message = await jetstream.get_msg(stream, sequence)
            except NotFoundError:
                continue  # a gap in the stream
            if message.subject != CHUNKS_EMBEDDED or not message.data:
                continue
            if await core.index_embedded(decode(events_pb2.ChunksEmbedded, message.data)) is not None:
                documents += 1
        return documents
    finally:
        await connection.close()
