"""The chunk index on Qdrant: one collection, a dense and a BM25 sparse vector per chunk.

Two engines behind one interface:
- `EdgeIndex` — qdrant-edge-py, Qdrant's storage and HNSW engine in-process (the embedded
  default, chosen by `bench.ingest.embedded_qdrant`; see the service README for the figures).
- `ClientIndex` — qdrant-client: a Qdrant server when `LLMOS_QDRANT_URL` is set, or the
  client's pure-Python local mode (`LLMOS_RETRIEVAL_EMBEDDED_ENGINE=local`). On a server the
  collection is created with a `CollectionLayout` (shards, replication, write consistency) for a
  Qdrant cluster; the embedded engines are one process and have no such layout.

Every read names a tenant: `ChunkFilter` always carries one, and each engine turns it into a
`must` condition on the `tenant` payload key (indexed as Qdrant's tenant key). Point ids are
chunk ids, so writing a chunk twice stores it once. Sparse vectors carry BM25 term weights; the
engines apply IDF at query time (Qdrant's IDF modifier), computed over the tenant's own chunks
where the engine supports it.

`SealedTextIndex` wraps either engine so chunk text is stored sealed (AES-GCM, key id in each
record): vectors are computed before storage, so search works on ciphertext payloads; ids,
tenant, titles, tags and sources stay in clear because filters and citations use them.

The methods are blocking; the core runs them on one worker thread.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from llmos.crypto import AtRest
from llmos.v1 import common_pb2

logger = logging.getLogger(__name__)

DENSE = "dense"
SPARSE = "bm25"
# Payload keys with an index: the tenant (Qdrant's tenant key) and everything filters name.
KEYWORD_FIELDS = ("document_id", "tags", "source", "content_hash")
SCROLL_PAGE = 1000


@dataclass(frozen=True)
class CollectionLayout:
    """How a collection spreads over a Qdrant cluster (set at creation)."""

    shard_number: int = 1
    replication_factor: int = 1
    # Replicas that must have a write before it is acknowledged.
    write_consistency_factor: int = 1


@dataclass(frozen=True)
class SparseVector:
    indices: list[int]
    values: list[float]


@dataclass(frozen=True)
class IndexedChunk:
    chunk: common_pb2.Chunk
    content_hash: str
    submitted_at: float  # seconds since the epoch: orders versions of a document
    dense: Sequence[float]
    sparse: SparseVector


@dataclass(frozen=True)
class ChunkFilter:
    tenant: str
    document_ids: Sequence[str] = ()
    tags: Sequence[str] = ()
    sources: Sequence[str] = ()
    exclude_document_ids: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not self.tenant:
            raise ValueError("every index read names a tenant")


@dataclass
class Hit:
    chunk: common_pb2.Chunk
    score: float
    content_hash: str = ""
    submitted_at: float = 0.0
    vector: list[float] | None = field(default=None, repr=False)


class ChunkIndex(Protocol):
    def upsert(self, chunks: Sequence[IndexedChunk]) -> None: ...
    def delete_document(self, tenant: str, document_id: str, keep_content_hash: str = "") -> None:
        """Remove a document's chunks; with `keep_content_hash`, only those of other versions."""
    def dense(self, vector: Sequence[float], where: ChunkFilter, limit: int, with_vectors: bool = False) -> list[Hit]: ...
    def sparse(self, vector: SparseVector, where: ChunkFilter, limit: int) -> list[Hit]: ...
    def chunks(self, where: ChunkFilter, with_vectors: bool = False, limit: int = 0) -> list[Hit]:
        """Chunks matching `where`, in no particular order; `limit` 0 means all."""
    def count(self, where: ChunkFilter) -> int: ...
    def close(self) -> None: ...


def payload_of(item: IndexedChunk) -> dict[str, Any]:
    chunk = item.chunk
    return {
        "tenant": chunk.tenant,
        "document_id": chunk.document_id,
        "chunk_id": chunk.chunk_id,
        "index": chunk.index,
        "text": chunk.text,
        "start_offset": chunk.start_offset,
        "end_offset": chunk.end_offset,
        "token_count": chunk.token_count,
        "title": chunk.title,
        "source": chunk.source,
        "tags": list(chunk.tags),
        "content_hash": item.content_hash,
        "submitted_at": item.submitted_at,
    }


def hit_of(point_id: Any, payload: dict[str, Any] | None, score: float, vector: list[float] | None = None) -> Hit:
    payload = payload or {}
    chunk = common_pb2.Chunk(
        chunk_id=str(payload.get("chunk_id") or point_id),
        document_id=payload.get("document_id", ""),
        tenant=payload.get("tenant", ""),
        index=int(payload.get("index", 0)),
        text=payload.get("text", ""),
        start_offset=int(payload.get("start_offset", 0)),
        end_offset=int(payload.get("end_offset", 0)),
        token_count=int(payload.get("token_count", 0)),
        title=payload.get("title", ""),
        source=payload.get("source", ""),
        tags=list(payload.get("tags", [])),
    )
    return Hit(chunk, score, payload.get("content_hash", ""), float(payload.get("submitted_at", 0.0)), vector)


def point_id(chunk_id: str) -> str:
    """Qdrant ids are UUIDs or integers; ingest's chunk ids are UUIDs already."""
    try:
        return str(uuid.UUID(chunk_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"llmos:chunk:{chunk_id}"))


def _dense_of(vector: Any) -> list[float] | None:
    if isinstance(vector, dict):
        dense = vector.get(DENSE)
        return list(dense) if dense is not None else None
    return None


class EdgeIndex:
    """qdrant-edge-py: one shard in a folder of this replica's own."""

    def __init__(self, path: Path, dimensions: int, bm25_avg_len: float) -> None:
        import qdrant_edge as qe

        self._qe = qe
        path.mkdir(parents=True, exist_ok=True)
        config = qe.EdgeConfig(
            vectors={DENSE: qe.EdgeVectorParams(size=dimensions, distance=qe.Distance.Cosine)},
            sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
        )
        if any(path.iterdir()):
            self._shard = qe.EdgeShard.load(str(path), config)
        else:
            self._shard = qe.EdgeShard.create(str(path), config)
            self._shard.update(qe.UpdateOperation.create_field_index("tenant", qe.KeywordIndexParams(is_tenant=True)))
            for name in KEYWORD_FIELDS:
                self._shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))

    def _filter(self, where: ChunkFilter, exclude_content_hash: str = "") -> Any:
        qe = self._qe
        must: list[Any] = [qe.FieldCondition("tenant", match=qe.MatchValue(where.tenant))]
        for key, values in (("document_id", where.document_ids), ("tags", where.tags), ("source", where.sources)):
            if values:
                must.append(qe.FieldCondition(key, match=qe.MatchAny(list(values))))
        must_not: list[Any] = []
        if where.exclude_document_ids:
            must_not.append(qe.FieldCondition("document_id", match=qe.MatchAny(list(where.exclude_document_ids))))
        if exclude_content_hash:
            must_not.append(qe.FieldCondition("content_hash", match=qe.MatchValue(exclude_content_hash)))
        return qe.Filter(must=must, must_not=must_not or None)

    def upsert(self, chunks: Sequence[IndexedChunk]) -> None:
        qe = self._qe
        points = [
            qe.Point(
                point_id(item.chunk.chunk_id),
                {DENSE: list(item.dense), SPARSE: qe.SparseVector(item.sparse.indices, item.sparse.values)},
                payload_of(item),
            )
            for item in chunks
        ]
        self._shard.update(qe.UpdateOperation.upsert_points(points))

    def delete_document(self, tenant: str, document_id: str, keep_content_hash: str = "") -> None:
        where = ChunkFilter(tenant, document_ids=(document_id,))
        self._shard.update(self._qe.UpdateOperation.delete_points_by_filter(self._filter(where, keep_content_hash)))

    def dense(self, vector: Sequence[float], where: ChunkFilter, limit: int, with_vectors: bool = False) -> list[Hit]:
        qe = self._qe
        points = self._shard.query(
            qe.QueryRequest(
                limit=limit,
                query=qe.Query.Nearest(list(vector), using=DENSE),
                filter=self._filter(where),
                with_payload=True,
                with_vector=[DENSE] if with_vectors else False,
            )
        )
        return [hit_of(p.id, p.payload, p.score, _dense_of(p.vector)) for p in points]

    def sparse(self, vector: SparseVector, where: ChunkFilter, limit: int) -> list[Hit]:
        qe = self._qe
        if not vector.indices:
            return []
        tenant_only = self._filter(ChunkFilter(where.tenant))
        points = self._shard.query(
            qe.QueryRequest(
                limit=limit,
                query=qe.Query.Nearest(qe.SparseVector(vector.indices, vector.values), using=SPARSE),
                filter=self._filter(where),
                with_payload=True,
                # IDF from the tenant's own chunks: other tenants' vocabulary does not leak in.
                params=qe.SearchParams(idf=qe.IdfParams(corpus=tenant_only)),
            )
        )
        return [hit_of(p.id, p.payload, p.score) for p in points]

    def chunks(self, where: ChunkFilter, with_vectors: bool = False, limit: int = 0) -> list[Hit]:
        qe = self._qe
        hits: list[Hit] = []
        offset = None
        while True:
            page = SCROLL_PAGE if not limit else min(SCROLL_PAGE, limit - len(hits))
            records, offset = self._shard.scroll(
                qe.ScrollRequest(
                    offset=offset, limit=page, filter=self._filter(where), with_payload=True,
                    with_vector=[DENSE] if with_vectors else False,
                )
            )
            hits.extend(hit_of(r.id, r.payload, 0.0, _dense_of(r.vector)) for r in records)
            if offset is None or (limit and len(hits) >= limit):
                return hits

    def count(self, where: ChunkFilter) -> int:
        return int(self._shard.count(self._qe.CountRequest(filter=self._filter(where), exact=True)))

    def close(self) -> None:
        self._shard.flush()
        self._shard.close()


class ClientIndex:
    """qdrant-client: a Qdrant server (`url`) or the client's local mode (`path`). `layout`
    applies to a server's collection created here; local mode ignores it."""

    def __init__(
        self,
        collection: str,
        dimensions: int,
        url: str = "",
        path: Path | None = None,
        api_key: str = "",
        layout: CollectionLayout = CollectionLayout(),
    ) -> None:
        from qdrant_client import QdrantClient, models
        from qdrant_client.http.exceptions import UnexpectedResponse

        self._models = models
        self._collection = collection
        if url:
            self._client = QdrantClient(url=url, api_key=api_key or None, timeout=30)
        elif path is not None:
            path.mkdir(parents=True, exist_ok=True)
            self._client = QdrantClient(path=str(path))
        else:
            self._client = QdrantClient(location=":memory:")
        if not self._client.collection_exists(collection):
            try:
                self._client.create_collection(
                    collection,
                    vectors_config={DENSE: models.VectorParams(size=dimensions, distance=models.Distance.COSINE)},
                    sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
                    shard_number=layout.shard_number,
                    replication_factor=layout.replication_factor,
                    write_consistency_factor=layout.write_consistency_factor,
                )
            except UnexpectedResponse:
                # Replicas starting together: another one created it between the check and here.
                if not self._client.collection_exists(collection):
                    raise
            if url:  # local mode has no payload indexes; creating one that exists changes nothing
                self._client.create_payload_index(
                    collection, "tenant", models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True)
                )
                for name in KEYWORD_FIELDS:
                    self._client.create_payload_index(collection, name, models.PayloadSchemaType.KEYWORD)

    def _filter(self, where: ChunkFilter, exclude_content_hash: str = "") -> Any:
        m = self._models
        must: list[Any] = [m.FieldCondition(key="tenant", match=m.MatchValue(value=where.tenant))]
        for key, values in (("document_id", where.document_ids), ("tags", where.tags), ("source", where.sources)):
            if values:
                must.append(m.FieldCondition(key=key, match=m.MatchAny(any=list(values))))
        must_not: list[Any] = []
        if where.exclude_document_ids:
            must_not.append(m.FieldCondition(key="document_id", match=m.MatchAny(any=list(where.exclude_document_ids))))
        if exclude_content_hash:
            must_not.append(m.FieldCondition(key="content_hash", match=m.MatchValue(value=exclude_content_hash)))
        return m.Filter(must=must, must_not=must_not or None)

    def upsert(self, chunks: Sequence[IndexedChunk]) -> None:
        m = self._models
        points = [
            m.PointStruct(
                id=point_id(item.chunk.chunk_id),
                vector={DENSE: list(item.dense), SPARSE: m.SparseVector(indices=item.sparse.indices, values=item.sparse.values)},
                payload=payload_of(item),
            )
            for item in chunks
        ]
        self._client.upsert(self._collection, points, wait=True)

    def delete_document(self, tenant: str, document_id: str, keep_content_hash: str = "") -> None:
        where = ChunkFilter(tenant, document_ids=(document_id,))
        self._client.delete(
            self._collection, self._models.FilterSelector(filter=self._filter(where, keep_content_hash)), wait=True
        )

    def dense(self, vector: Sequence[float], where: ChunkFilter, limit: int, with_vectors: bool = False) -> list[Hit]:
        response = self._client.query_points(
            self._collection, query=list(vector), using=DENSE, query_filter=self._filter(where), limit=limit,
            with_payload=True, with_vectors=[DENSE] if with_vectors else False,
        )
        return [hit_of(p.id, p.payload, p.score, _dense_of(p.vector)) for p in response.points]

    def sparse(self, vector: SparseVector, where: ChunkFilter, limit: int) -> list[Hit]:
        m = self._models
        if not vector.indices:
            return []
        response = self._client.query_points(
            self._collection,
            query=m.SparseVector(indices=vector.indices, values=vector.values),
            using=SPARSE,
            query_filter=self._filter(where),
            limit=limit,
            with_payload=True,
        )
        return [hit_of(p.id, p.payload, p.score) for p in response.points]

    def chunks(self, where: ChunkFilter, with_vectors: bool = False, limit: int = 0) -> list[Hit]:
        hits: list[Hit] = []
        offset = None
        while True:
            page = SCROLL_PAGE if not limit else min(SCROLL_PAGE, limit - len(hits))
            records, offset = self._client.scroll(
                self._collection, scroll_filter=self._filter(where), limit=page, offset=offset,
                with_payload=True, with_vectors=[DENSE] if with_vectors else False,
            )
            hits.extend(hit_of(r.id, r.payload, 0.0, _dense_of(r.vector)) for r in records)
            if offset is None or (limit and len(hits) >= limit):
                return hits

    def count(self, where: ChunkFilter) -> int:
        return int(self._client.count(self._collection, count_filter=self._filter(where), exact=True).count)

    def close(self) -> None:
        self._client.close()


class SealedTextIndex:
    """Chunk text sealed on the way in and opened on the way out; bound to tenant and chunk id,
    so a ciphertext copied into another tenant's point fails to open."""

    def __init__(self, inner: ChunkIndex, at_rest: AtRest) -> None:
        self._inner = inner
        self._at_rest = at_rest

    @staticmethod
    def _bound_to(chunk: common_pb2.Chunk) -> bytes:
        return f"chunk\x00{chunk.tenant}\x00{chunk.chunk_id}".encode()

    def _sealed(self, item: IndexedChunk) -> IndexedChunk:
        chunk = common_pb2.Chunk()
        chunk.CopyFrom(item.chunk)
        chunk.text = self._at_rest.seal_text(item.chunk.text, self._bound_to(item.chunk))
        return replace(item, chunk=chunk)

    def _opened(self, hits: list[Hit]) -> list[Hit]:
        for hit in hits:
            hit.chunk.text = self._at_rest.open_text(hit.chunk.text, self._bound_to(hit.chunk))
        return hits

    def upsert(self, chunks: Sequence[IndexedChunk]) -> None:
        self._inner.upsert([self._sealed(item) for item in chunks])

    def delete_document(self, tenant: str, document_id: str, keep_content_hash: str = "") -> None:
        self._inner.delete_document(tenant, document_id, keep_content_hash)

    def dense(self, vector: Sequence[float], where: ChunkFilter, limit: int, with_vectors: bool = False) -> list[Hit]:
        return self._opened(self._inner.dense(vector, where, limit, with_vectors))

    def sparse(self, vector: SparseVector, where: ChunkFilter, limit: int) -> list[Hit]:
        return self._opened(self._inner.sparse(vector, where, limit))

    def chunks(self, where: ChunkFilter, with_vectors: bool = False, limit: int = 0) -> list[Hit]:
        return self._opened(self._inner.chunks(where, with_vectors, limit))

    def count(self, where: ChunkFilter) -> int:
        return self._inner.count(where)

    def close(self) -> None:
        self._inner.close()
