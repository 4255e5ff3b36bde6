"""Retrieval logic, shared by the gRPC API and the bus consumers.

- Indexing (`index_embedded`): a `ChunksEmbedded` message is one document's chunks with their
  dense vectors. Its chunks get BM25 sparse vectors and are upserted by chunk id (a redelivered
  message writes the same points again); then every chunk of another version of the document
  is removed, so a shorter re-submission leaves no stale chunks. A message older than the
  version already stored (a late redelivery) changes nothing. The result is the
  `DocumentIndexed` event to publish.
- Deletion leaves a tombstone (the deletion time) that indexing checks first: a version
  submitted before the delete that is still in flight (embedding) when the delete lands is
  dropped, not resurrected; a version submitted after it clears the tombstone.
- Search: dense (query embedded by the inference service), sparse (BM25 with IDF), or hybrid:
  both candidate lists fused by reciprocal rank fusion. Always within one tenant.
- Recommend: documents near the centroid of what the user read or was shown, leaving those out.
- GetDocument: a document's chunks in order, page by page.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import metrics

from llmos.errors import InvalidArgument, LlmosError, NotFound
from llmos.telemetry import seconds_histogram
from llmos.v1 import common_pb2, events_pb2, retrieval_pb2
from services.retrieval.index import ChunkFilter, ChunkIndex, Hit, IndexedChunk, SparseVector
from services.retrieval.profiles import ProfileStore
from services.retrieval.sparse import Bm25Encoder

T = TypeVar("T")
MAX_FILTER_VALUES = 256
# Documents of a search remembered as "asked about" in the user's profile.
ASKED_PER_SEARCH = 3
# Read documents weigh more than documents a search only surfaced.
READ_WEIGHT, ASKED_WEIGHT = 1.0, 0.5
# Tombstones are records in the index itself, under a tenant no caller can name (tenants never
# hold NUL), so tenant-filtered reads never see them. The index has exactly the scope they need:
# shared by the replicas of a Qdrant server, one per replica when embedded, durable with the chunks.
TOMBSTONE_TENANT = "\x00tombstones"


class QueryEmbedder(Protocol):
    async def embed(self, texts: Sequence[str], tenant: str) -> np.ndarray:
        """(len(texts), dimensions) L2-normalized vectors from the platform's embedding model."""


@dataclass(frozen=True)
class SearchLimits:
    default_top_k: int
    max_top_k: int
    candidates: int  # depth of each list before fusion
    rrf_k: int
    max_query_chars: int
    page_size: int
    max_page_size: int


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def rrf(rankings: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """Reciprocal rank fusion: each list adds 1 / (k + rank) to a chunk's score (rank from 1)."""
    fused: dict[str, Hit] = {}
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            key = hit.chunk.chunk_id
            fused.setdefault(key, hit)
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    ordered = sorted(scores, key=lambda key: (-scores[key], key))
    return [Hit(fused[key].chunk, scores[key], fused[key].content_hash, fused[key].submitted_at) for key in ordered]


def _filter(tenant: str, request_filter: retrieval_pb2.SearchFilter) -> ChunkFilter:
    for name in ("document_ids", "tags", "sources"):
        if len(getattr(request_filter, name)) > MAX_FILTER_VALUES:
            raise InvalidArgument(f"filter.{name}", f"at most {MAX_FILTER_VALUES} values")
    return ChunkFilter(
        tenant,
        document_ids=list(request_filter.document_ids),
        tags=list(request_filter.tags),
        sources=list(request_filter.sources),
    )


def _tombstone_key(tenant: str, document_id: str) -> str:
    return f"{tenant}\x00{document_id}"


def _seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def _normalized(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


class RetrievalCore:
    def __init__(
        self,
        index: ChunkIndex,
        bm25: Bm25Encoder,
        embedder: QueryEmbedder,
        profiles: ProfileStore,
        dimensions: int,
        limits: SearchLimits,
    ) -> None:
        self._index = index
        self._bm25 = bm25
        self._embedder = embedder
        self._profiles = profiles
        self._dimensions = dimensions
        self._limits = limits
        # One thread owns the index: the engines are blocking, and local mode is not thread-safe.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qdrant")
        # Indexing's steps: encode (validation and BM25 sparse vectors) and store (the index
        # thread's reads and writes: tombstone and version checks, upsert, stale chunks removed).
        self._index_duration = seconds_histogram(
            metrics.get_meter("llmos.retrieval"), "llmos.retrieval.index.duration", "time one indexing step took"
        )

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    # Indexing ---------------------------------------------------------------------------

    def _validate(self, message: events_pb2.ChunksEmbedded) -> None:
        if not message.tenant or "\x00" in message.tenant:
            raise InvalidArgument("tenant", "every document belongs to a tenant (a name without NUL)")
        if not message.document_id:
            raise InvalidArgument("document_id", "is required")
        if not message.content_hash:
            raise InvalidArgument("content_hash", "is required to tell versions of a document apart")
        if not message.chunks:
            raise InvalidArgument("chunks", "a document has at least one chunk")
        for position, embedded in enumerate(message.chunks):
            chunk = embedded.chunk
            if chunk.document_id != message.document_id or chunk.tenant != message.tenant:
                raise InvalidArgument(f"chunks[{position}]", "belongs to another document or tenant")
            if not chunk.chunk_id:
                raise InvalidArgument(f"chunks[{position}].chunk_id", "is required")
            if len(embedded.vector) != self._dimensions:
                raise InvalidArgument(
                    f"chunks[{position}].vector", f"has {len(embedded.vector)} dimensions; the index holds {self._dimensions}"
                )
            if not all(math.isfinite(value) for value in embedded.vector):
                raise InvalidArgument(f"chunks[{position}].vector", "has a value that is not a finite number")

    async def index_embedded(self, message: events_pb2.ChunksEmbedded) -> events_pb2.DocumentIndexed | None:
        """Store a document's embedded chunks; the event to publish, or None for a stale message."""
        (result,) = await self.index_embedded_many([message])
        if isinstance(result, BaseException):
            raise result
        return result

    async def index_embedded_many(
        self, messages: Sequence[events_pb2.ChunksEmbedded]
    ) -> list[events_pb2.DocumentIndexed | None | LlmosError]:
        """`index_embedded` for several documents (each at most once) in one trip to the index
        thread and one upsert: per message its event, None when stale, or the error that refuses it."""
        started = time.perf_counter()
        results: list[events_pb2.DocumentIndexed | None | LlmosError] = [None] * len(messages)
        accepted: list[tuple[int, events_pb2.ChunksEmbedded, float, list[IndexedChunk]]] = []
        for position, message in enumerate(messages):
            try:
                self._validate(message)
            except LlmosError as exc:
                results[position] = exc
                continue
            submitted_at = _seconds(message.submitted_at) if message.HasField("submitted_at") else 0.0
            items = [
                IndexedChunk(embedded.chunk, message.content_hash, submitted_at, list(embedded.vector),
                             self._bm25.document(embedded.chunk.text))
                for embedded in message.chunks
            ]
            accepted.append((position, message, submitted_at, items))
        self._index_duration.record(time.perf_counter() - started, {"step": "encode"})
        if not accepted:
            return results

        def current(message: events_pb2.ChunksEmbedded, submitted_at: float) -> bool:
            """Whether this version is still the one to index (clearing a tombstone it outlives)."""
            deleted_at = self._deleted_at(message.tenant, message.document_id)
            if deleted_at is not None:
                if deleted_at >= submitted_at:
                    return False  # this version was deleted while it was being embedded
                self._index.delete_document(TOMBSTONE_TENANT, _tombstone_key(message.tenant, message.document_id))
            (stored,) = self._index.chunks(ChunkFilter(message.tenant, document_ids=(message.document_id,)), limit=1) or (None,)
            # Not when a newer version is already indexed.
            return stored is None or stored.content_hash == message.content_hash or stored.submitted_at <= submitted_at

        def store() -> list[tuple[int, int]]:
            fresh = [(position, message, items) for position, message, submitted_at, items in accepted
                     if current(message, submitted_at)]
            if fresh:
                self._index.upsert([item for _, _, items in fresh for item in items])
            counts = []
            for position, message, _ in fresh:
                self._index.delete_document(message.tenant, message.document_id, keep_content_hash=message.content_hash)
                counts.append((position, self._index.count(ChunkFilter(message.tenant, document_ids=(message.document_id,)))))
            return counts

        started = time.perf_counter()
        counts = await self._run(store)
        self._index_duration.record(time.perf_counter() - started, {"step": "store"})
        for position, chunk_count in counts:
            message = messages[position]
            results[position] = events_pb2.DocumentIndexed(
                document_id=message.document_id,
                tenant=message.tenant,
                content_hash=message.content_hash,
                chunk_count=chunk_count,
                indexed_at=now(),
            )
        return results

    def _deleted_at(self, tenant: str, document_id: str) -> float | None:
        """When the document was last deleted, if no later version has been indexed since."""
        where = ChunkFilter(TOMBSTONE_TENANT, document_ids=(_tombstone_key(tenant, document_id),))
        (tombstone,) = self._index.chunks(where, limit=1) or (None,)
        return tombstone.submitted_at if tombstone is not None else None

    def _tombstone(self, tenant: str, document_id: str, deleted_at: float) -> IndexedChunk:
        key = _tombstone_key(tenant, document_id)
        chunk = common_pb2.Chunk(
            chunk_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"llmos:tombstone:{key}")), document_id=key, tenant=TOMBSTONE_TENANT
        )
        # Engines need a dense vector; any unit vector does, nothing searches this tenant.
        unit = [1.0] + [0.0] * (self._dimensions - 1)
        return IndexedChunk(chunk, "", deleted_at, unit, SparseVector([], []))

    async def delete_document(self, message: events_pb2.DocumentDeleted) -> None:
        if not message.tenant or not message.document_id:
            raise InvalidArgument("document_id" if message.tenant else "tenant", "is required")
        if "\x00" in message.tenant:
            raise InvalidArgument("tenant", "a tenant name holds no NUL")
        deleted_at = _seconds(message.deleted_at) if message.HasField("deleted_at") else time.time()
        tombstone = self._tombstone(message.tenant, message.document_id, deleted_at)

        def delete() -> None:
            # Tombstone first: an index of an older version racing this delete then finds it.
            if (self._deleted_at(message.tenant, message.document_id) or 0.0) < deleted_at:
                self._index.upsert([tombstone])
            self._index.delete_document(message.tenant, message.document_id)

        await self._run(delete)

    # Search -----------------------------------------------------------------------------

    def _top_k(self, requested: int) -> int:
        if requested < 0 or requested > self._limits.max_top_k:
            raise InvalidArgument("top_k", f"must be between 1 and {self._limits.max_top_k} (0: {self._limits.default_top_k})")
        return requested or self._limits.default_top_k

    async def search(
        self, tenant: str, request: retrieval_pb2.SearchRequest, user_id: str = ""
    ) -> retrieval_pb2.SearchResponse:
        """Hybrid, dense or sparse search; the top documents go into `user_id`'s profile (the
        request's user as `llmos.users.acting_user` settled it; empty: nobody's)."""
        query = request.query.strip()
        if not query:
            raise InvalidArgument("query", "is empty")
        if len(query) > self._limits.max_query_chars:
            raise InvalidArgument("query", f"{len(query)} characters is over the limit of {self._limits.max_query_chars}")
        top_k = self._top_k(request.top_k)
        mode = request.mode or retrieval_pb2.SEARCH_MODE_HYBRID
        if mode not in (retrieval_pb2.SEARCH_MODE_HYBRID, retrieval_pb2.SEARCH_MODE_DENSE, retrieval_pb2.SEARCH_MODE_SPARSE):
            raise InvalidArgument("mode", f"unknown search mode {mode}")
        where = _filter(tenant, request.filter)
        depth = max(top_k, self._limits.candidates)
        rankings: list[list[Hit]] = []
        cosine: dict[str, float] = {}
        if mode in (retrieval_pb2.SEARCH_MODE_HYBRID, retrieval_pb2.SEARCH_MODE_DENSE):
            vector = await self._query_vector(tenant, query, request.query_vector)
            dense = await self._run(lambda: self._index.dense(vector, where, depth))
            cosine = {hit.chunk.chunk_id: hit.score for hit in dense}
            rankings.append(dense)
        if mode in (retrieval_pb2.SEARCH_MODE_HYBRID, retrieval_pb2.SEARCH_MODE_SPARSE):
            sparse = self._bm25.query(query)
            rankings.append(await self._run(lambda: self._index.sparse(sparse, where, depth)))
        hits = (rrf(rankings, self._limits.rrf_k) if len(rankings) > 1 else rankings[0])[:top_k]
        if user_id and hits:
            asked = list(dict.fromkeys(hit.chunk.document_id for hit in hits))[:ASKED_PER_SEARCH]
            await self._profiles.record_asked(tenant, user_id, asked)
        return retrieval_pb2.SearchResponse(
            hits=[
                retrieval_pb2.ScoredChunk(chunk=hit.chunk, score=hit.score, dense_score=cosine.get(hit.chunk.chunk_id, 0.0))
                for hit in hits
            ],
            mode=mode,
        )

    async def _query_vector(self, tenant: str, query: str, given: Sequence[float]) -> list[float]:
        """The caller's query embedding when it sent one (it must fit the index), else embedded here."""
        if not given:
            return (await self._embedder.embed([query], tenant))[0].tolist()
        if len(given) != self._dimensions:
            raise InvalidArgument("query_vector", f"has {len(given)} dimensions; the index holds {self._dimensions}")
        vector = np.asarray(given, dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        if not math.isfinite(norm) or norm == 0.0:
            raise InvalidArgument("query_vector", "must be finite and not all zeros")
        return (vector / norm).tolist()

    # Recommend --------------------------------------------------------------------------

    async def _document_vectors(self, tenant: str, document_ids: Sequence[str]) -> dict[str, tuple[str, np.ndarray]]:
        """Each document's title and centroid of its chunk vectors."""
        hits = await self._run(lambda: self._index.chunks(ChunkFilter(tenant, document_ids=document_ids), with_vectors=True))
        grouped: dict[str, list[Hit]] = {}
        for hit in hits:
            if hit.vector is not None:
                grouped.setdefault(hit.chunk.document_id, []).append(hit)
        return {
            document_id: (group[0].chunk.title or document_id, _normalized(np.mean([h.vector for h in group], axis=0)))
            for document_id, group in grouped.items()
        }

    async def recommend(
        self, tenant: str, request: retrieval_pb2.RecommendRequest, user_id: str
    ) -> retrieval_pb2.RecommendResponse:
        """Documents like those in `user_id`'s profile (the request's user, settled by the caller)."""
        if not user_id:
            raise InvalidArgument("user_id", "is required: recommendations are for one user")
        top_k = self._top_k(request.top_k)
        profile = await self._profiles.get(tenant, user_id)
        seeds = profile.seen()
        if not seeds:
            return retrieval_pb2.RecommendResponse()
        vectors = await self._document_vectors(tenant, seeds)
        if not vectors:
            return retrieval_pb2.RecommendResponse()
        read = set(profile.read)
        weights = np.array([READ_WEIGHT if doc in read else ASKED_WEIGHT for doc in vectors])
        centroid = _normalized(np.average(np.stack([v for _, v in vectors.values()]), axis=0, weights=weights))
        exclude = () if request.include_seen else tuple(seeds)
        # Several chunks per document come back: ask for enough to fill top_k documents.
        hits = await self._run(
            lambda: self._index.dense(
                centroid.tolist(), ChunkFilter(tenant, exclude_document_ids=exclude), top_k * 8, with_vectors=True
            )
        )
        best: dict[str, Hit] = {}
        for hit in hits:
            best.setdefault(hit.chunk.document_id, hit)
        recommendations = []
        for document_id, hit in list(best.items())[:top_k]:
            vector = np.asarray(hit.vector if hit.vector is not None else centroid)
            nearest_title = max(vectors.values(), key=lambda seed: float(seed[1] @ vector))[0]
            recommendations.append(
                retrieval_pb2.Recommendation(
                    document_id=document_id, title=hit.chunk.title, score=hit.score, reason=f"similar to {nearest_title}"
                )
            )
        return retrieval_pb2.RecommendResponse(recommendations=recommendations)

    # Documents --------------------------------------------------------------------------

    async def get_document(
        self, tenant: str, request: retrieval_pb2.GetDocumentRequest, user_id: str = ""
    ) -> retrieval_pb2.GetDocumentResponse:
        """A page of the document's chunks, recorded as read in `user_id`'s profile (empty: nobody's)."""
        if not request.document_id:
            raise InvalidArgument("document_id", "is required")
        page_size = request.page.page_size or self._limits.page_size
        if not 0 < page_size <= self._limits.max_page_size:
            raise InvalidArgument("page.page_size", f"must be between 1 and {self._limits.max_page_size}")
        token = request.page.page_token or "0"
        if not token.isdigit():
            raise InvalidArgument("page.page_token", "is not a token this service returned")
        start = int(token)
        hits = await self._run(lambda: self._index.chunks(ChunkFilter(tenant, document_ids=(request.document_id,))))
        if not hits:
            raise NotFound(f"no indexed document {request.document_id!r} in tenant {tenant!r}")
        chunks = sorted((hit.chunk for hit in hits), key=lambda chunk: chunk.index)
        page = chunks[start:start + page_size]
        following = start + page_size
        if user_id:
            await self._profiles.record_read(tenant, user_id, request.document_id)
        first = chunks[0]
        return retrieval_pb2.GetDocumentResponse(
            document_id=request.document_id,
            title=first.title,
            source=first.source,
            tags=list(first.tags),
            chunk_count=len(chunks),
            chunks=page,
            page=common_pb2.PageResponse(next_page_token=str(following) if following < len(chunks) else ""),
        )

    def close(self) -> None:
        self._executor.submit(self._index.close).result()
        self._executor.shutdown()

