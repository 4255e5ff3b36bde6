"""The retrieval core on both embedded engines: indexing, versions, search modes, tenancy,
paging and recommendations. Vectors come from a bag-of-words stand-in, not the model."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from llmos.errors import InvalidArgument, NotFound
from llmos.testing import MemoryBucket
from llmos.v1 import common_pb2, events_pb2, retrieval_pb2
from services.retrieval.core import RetrievalCore, SearchLimits, rrf
from services.retrieval.index import ChunkIndex, ClientIndex, EdgeIndex, Hit
from services.retrieval.profiles import KvProfileStore
from services.retrieval.sparse import Bm25Encoder

pytestmark = pytest.mark.unit

DIMENSIONS = 64
LIMITS = SearchLimits(default_top_k=5, max_top_k=100, candidates=20, rrf_k=60, max_query_chars=200, page_size=2, max_page_size=10)


def bag_of_words(text: str) -> np.ndarray:
    vector = np.zeros(DIMENSIONS, dtype=np.float32)
    for word in text.lower().replace(".", " ").split():
        vector[int(hashlib.sha256(word.encode()).hexdigest(), 16) % DIMENSIONS] += 1.0
    return vector / max(float(np.linalg.norm(vector)), 1e-9)


class WordEmbedder:
    async def embed(self, texts: Sequence[str], tenant: str) -> np.ndarray:
        return np.stack([bag_of_words(text) for text in texts])


def memory_profiles() -> KvProfileStore:
    return KvProfileStore(MemoryBucket(), cap=100)


def embedded(tenant: str, document_id: str, texts: Sequence[str], content_hash: str = "v1", at: int = 100,
             tags: Sequence[str] = (), priority: int = 0) -> events_pb2.ChunksEmbedded:
    message = events_pb2.ChunksEmbedded(document_id=document_id, tenant=tenant, content_hash=content_hash, priority=priority)
    message.submitted_at.FromSeconds(at)
    for index, text in enumerate(texts):
        chunk = common_pb2.Chunk(
            chunk_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant}/{document_id}#{index}")), document_id=document_id,
            tenant=tenant, index=index, text=text, start_offset=index * 100, end_offset=index * 100 + len(text),
            title=f"Title of {document_id}", source="unit", tags=list(tags),
        )
        message.chunks.append(events_pb2.EmbeddedChunk(chunk=chunk, vector=bag_of_words(text).tolist()))
    return message


@pytest.fixture(params=["edge", "local"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkIndex]:
    engine: ChunkIndex = (
        EdgeIndex(tmp_path / "edge", DIMENSIONS, 256.0) if request.param == "edge" else ClientIndex("chunks", DIMENSIONS)
    )
    yield engine


@pytest.fixture
def profiles() -> KvProfileStore:
    return memory_profiles()


@pytest.fixture
def core(index: ChunkIndex, profiles: KvProfileStore) -> Iterator[RetrievalCore]:
    core = RetrievalCore(index, Bm25Encoder(256.0), WordEmbedder(), profiles, DIMENSIONS, LIMITS)
    yield core
    core.close()


async def load_corpus(core: RetrievalCore) -> None:
    await core.index_embedded(embedded("acme", "returns", ["Returns are free within thirty days.", "Refunds reach your card in five days."], tags=["policy"]))
    await core.index_embedded(embedded("acme", "shipping", ["Shipping takes two to four days.", "Express shipping costs extra."]))
    await core.index_embedded(embedded("acme", "password", ["Reset your password from the login page."], tags=["account"]))
    await core.index_embedded(embedded("globex", "secret", ["Returns are never accepted at Globex."]))


def search(query: str, mode: int = 0, **fields: object) -> retrieval_pb2.SearchRequest:
    return retrieval_pb2.SearchRequest(query=query, mode=mode, **fields)  # type: ignore[arg-type]


def test_rrf_adds_reciprocal_ranks() -> None:
    def hits(*ids: str) -> list[Hit]:
        return [Hit(common_pb2.Chunk(chunk_id=i), 0.0) for i in ids]

    fused = rrf([hits("a", "b", "c"), hits("c", "a")], k=60)
    assert [hit.chunk.chunk_id for hit in fused] == ["a", "c", "b"]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62)


async def test_indexing_reports_the_document(core: RetrievalCore) -> None:
    indexed = await core.index_embedded(embedded("acme", "returns", ["one.", "two.", "three."]))
    assert indexed is not None
    assert (indexed.document_id, indexed.tenant, indexed.content_hash, indexed.chunk_count) == ("returns", "acme", "v1", 3)
    again = await core.index_embedded(embedded("acme", "returns", ["one.", "two.", "three."]))
    assert again is not None and again.chunk_count == 3  # a redelivery stores each chunk once


async def test_resubmission_replaces_chunks_and_stale_versions_are_ignored(core: RetrievalCore) -> None:
    await core.index_embedded(embedded("acme", "doc", ["old one.", "old two.", "old three."], "v1", at=100))
    replaced = await core.index_embedded(embedded("acme", "doc", ["new one."], "v2", at=200))
    assert replaced is not None and replaced.chunk_count == 1
    assert await core.index_embedded(embedded("acme", "doc", ["old one.", "old two."], "v1", at=100)) is None
    document = await core.get_document("acme", retrieval_pb2.GetDocumentRequest(document_id="doc"))
    assert [chunk.text for chunk in document.chunks] == ["new one."]


@pytest.mark.parametrize("mode", [retrieval_pb2.SEARCH_MODE_HYBRID, retrieval_pb2.SEARCH_MODE_DENSE, retrieval_pb2.SEARCH_MODE_SPARSE])
async def test_each_mode_finds_the_answer_within_the_tenant(core: RetrievalCore, mode: int) -> None:
    await load_corpus(core)
    response = await core.search("acme", search("how do returns work", mode))
    assert response.hits[0].chunk.document_id == "returns"
    assert response.mode == mode
    assert all(hit.chunk.tenant == "acme" for hit in response.hits)
    assert [hit.score for hit in response.hits] == sorted((hit.score for hit in response.hits), reverse=True)
    globex = await core.search("globex", search("returns", mode))
    assert {hit.chunk.document_id for hit in globex.hits} == {"secret"}


async def test_filters_and_citation_fields(core: RetrievalCore) -> None:
    await load_corpus(core)
    response = await core.search("acme", search("days", filter=retrieval_pb2.SearchFilter(tags=["policy"])))
    assert {hit.chunk.document_id for hit in response.hits} == {"returns"}
    hit = response.hits[0].chunk
    assert hit.title == "Title of returns" and hit.end_offset > hit.start_offset and hit.chunk_id
    by_id = await core.search("acme", search("days", filter=retrieval_pb2.SearchFilter(document_ids=["shipping"])))
    assert {hit.chunk.document_id for hit in by_id.hits} == {"shipping"}
    assert not (await core.search("acme", search("days", filter=retrieval_pb2.SearchFilter(sources=["web"])))).hits


async def test_delete_removes_every_chunk(core: RetrievalCore) -> None:
    await load_corpus(core)
    await core.delete_document(events_pb2.DocumentDeleted(document_id="returns", tenant="acme"))
    response = await core.search("acme", search("returns refunds", top_k=10))
    assert "returns" not in {hit.chunk.document_id for hit in response.hits}
    with pytest.raises(NotFound):
        await core.get_document("acme", retrieval_pb2.GetDocumentRequest(document_id="returns"))


async def test_document_pages_in_chunk_order(core: RetrievalCore) -> None:
    await core.index_embedded(embedded("acme", "long", [f"Part {i}." for i in range(5)]))
    tokens, texts = [""], []
    while True:
        page = await core.get_document(
            "acme", retrieval_pb2.GetDocumentRequest(document_id="long", page=common_pb2.PageRequest(page_token=tokens[-1]))
        )
        assert page.chunk_count == 5 and page.title == "Title of long"
        texts += [chunk.text for chunk in page.chunks]
        if not page.page.next_page_token:
            break
        tokens.append(page.page.next_page_token)
    assert texts == [f"Part {i}." for i in range(5)] and len(tokens) == 3
    with pytest.raises(NotFound):
        await core.get_document("globex", retrieval_pb2.GetDocumentRequest(document_id="long"))


async def test_recommend_from_reading_excludes_what_was_seen(core: RetrievalCore, profiles: KvProfileStore) -> None:
    await load_corpus(core)
    await core.index_embedded(embedded("acme", "refund-times", ["Refunds reach your card in five working days."]))
    assert not (await core.recommend("acme", retrieval_pb2.RecommendRequest(), "ann")).recommendations
    await core.get_document("acme", retrieval_pb2.GetDocumentRequest(document_id="returns"), "ann")
    response = await core.recommend("acme", retrieval_pb2.RecommendRequest(top_k=2), "ann")
    ids = [rec.document_id for rec in response.recommendations]
    assert ids[0] == "refund-times" and "returns" not in ids and "secret" not in ids
    assert response.recommendations[0].reason == "similar to Title of returns"
    with_seen = await core.recommend("acme", retrieval_pb2.RecommendRequest(include_seen=True, top_k=1), "ann")
    assert with_seen.recommendations[0].document_id == "returns"
    # The core records for the user its caller settled, never for one the request names.
    await core.search("acme", search("password login", user_id="bob"), "ann")
    assert not (await profiles.get("acme", "bob")).seen()
    assert (await profiles.get("acme", "ann")).asked[0] == "password"


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"query": "  "}, "query"),
        ({"query": "x" * 201}, "query"),
        ({"query": "ok", "top_k": 101}, "top_k"),
        ({"query": "ok", "top_k": -1}, "top_k"),
        ({"query": "ok", "mode": 9}, "mode"),
        ({"query": "ok", "filter": retrieval_pb2.SearchFilter(tags=["t"] * 300)}, "filter.tags"),
    ],
)
async def test_bad_searches_name_the_field(core: RetrievalCore, request_fields: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        await core.search("acme", retrieval_pb2.SearchRequest(**request_fields))
    assert error.value.field == field


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: m.ClearField("tenant"), "tenant"),
        (lambda m: m.ClearField("chunks"), "chunks"),
        (lambda m: m.chunks[0].vector.append(0.5), "chunks[0].vector"),
        (lambda m: setattr(m.chunks[0].chunk, "tenant", "globex"), "chunks[0]"),
        (lambda m: m.chunks[0].vector.__setitem__(0, float("nan")), "chunks[0].vector"),
    ],
)
async def test_bad_messages_are_invalid_argument(core: RetrievalCore, mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    message = embedded("acme", "doc", ["text."])
    mutate(message)
    with pytest.raises(InvalidArgument) as error:
        await core.index_embedded(message)
    assert error.value.field == field
