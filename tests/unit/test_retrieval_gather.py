"""Bulk indexing in gathered calls: services.retrieval.gather.Gatherer (messages that arrive while a
call runs share the next one, one per key, each caller with its own result or failure) and
RetrievalCore.index_embedded_many (several documents in one upsert, with the guarantees of one)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from llmos.errors import InvalidArgument, LlmosError
from llmos.v1 import events_pb2, retrieval_pb2
from services.retrieval.core import RetrievalCore
from services.retrieval.gather import Gatherer
from services.retrieval.index import ChunkFilter, EdgeIndex, IndexedChunk
from services.retrieval.sparse import Bm25Encoder
from tests.unit.test_retrieval_core import DIMENSIONS, LIMITS, WordEmbedder, embedded, memory_profiles

pytestmark = pytest.mark.unit


class Recorder:
    """Work that records each call's items, holds the first call until released, and fails on request."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()

    async def __call__(self, items: Sequence[str]) -> list[str | BaseException]:
        self.calls.append(list(items))
        if len(self.calls) == 1:
            await self.release.wait()
        if "boom-call" in items:
            raise RuntimeError("the index is down")
        return [InvalidArgument("item", "is bad") if item.startswith("bad") else item.upper() for item in items]


async def test_what_arrives_during_a_call_shares_the_next_call() -> None:
    work = Recorder()
    gatherer = Gatherer[str, str](work, max_items=3)
    first = asyncio.create_task(gatherer.submit("a"))
    await asyncio.sleep(0)
    others = [asyncio.create_task(gatherer.submit(item)) for item in ("b", "c", "d", "e")]
    await asyncio.sleep(0)
    work.release.set()
    assert await first == "A"
    assert [await task for task in others] == ["B", "C", "D", "E"]
    # The first ran alone at once; the four that waited went in calls of at most three, in order.
    assert work.calls == [["a"], ["b", "c", "d"], ["e"]]


async def test_items_with_one_key_never_share_a_call() -> None:
    work = Recorder()
    gatherer = Gatherer[str, str](work, max_items=8, key=lambda item: item[0])
    first = asyncio.create_task(gatherer.submit("x0"))
    await asyncio.sleep(0)
    others = [asyncio.create_task(gatherer.submit(item)) for item in ("d1", "d2", "e1")]
    await asyncio.sleep(0)
    work.release.set()
    await asyncio.gather(first, *others)
    assert work.calls == [["x0"], ["d1", "e1"], ["d2"]]


async def test_each_caller_gets_its_own_failure() -> None:
    work = Recorder()
    gatherer = Gatherer[str, str](work, max_items=8)
    first = asyncio.create_task(gatherer.submit("a"))
    await asyncio.sleep(0)
    good, bad = asyncio.create_task(gatherer.submit("b")), asyncio.create_task(gatherer.submit("bad"))
    await asyncio.sleep(0)
    work.release.set()
    assert await first == "A" and await good == "B"
    with pytest.raises(InvalidArgument):
        await bad
    # A failing call fails every item in it, and the gatherer goes on.
    failing = await asyncio.gather(gatherer.submit("boom-call"), return_exceptions=True)
    assert isinstance(failing[0], RuntimeError)
    assert await gatherer.submit("after") == "AFTER"


async def test_a_cancelled_caller_is_left_out() -> None:
    work = Recorder()
    gatherer = Gatherer[str, str](work, max_items=8)
    first = asyncio.create_task(gatherer.submit("a"))
    await asyncio.sleep(0)
    cancelled, kept = asyncio.create_task(gatherer.submit("gone")), asyncio.create_task(gatherer.submit("kept"))
    await asyncio.sleep(0)
    cancelled.cancel()
    work.release.set()
    assert await first == "A" and await kept == "KEPT"
    assert work.calls == [["a"], ["kept"]]


def _deleted(tenant: str, document_id: str, at: int) -> events_pb2.DocumentDeleted:
    message = events_pb2.DocumentDeleted(document_id=document_id, tenant=tenant)
    message.deleted_at.FromSeconds(at)
    return message


class CountingIndex(EdgeIndex):
    """The embedded engine, counting upsert calls."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, DIMENSIONS, 256.0)
        self.upserts = 0

    def upsert(self, chunks: Sequence[IndexedChunk]) -> None:
        self.upserts += 1
        super().upsert(chunks)


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[tuple[RetrievalCore, CountingIndex]]:
    index = CountingIndex(tmp_path / "edge")
    core = RetrievalCore(index, Bm25Encoder(256.0), WordEmbedder(), memory_profiles(), DIMENSIONS, LIMITS)
    yield core, index
    core.close()


async def test_many_documents_in_one_upsert_keep_each_ones_guarantees(counted: tuple[RetrievalCore, CountingIndex]) -> None:
    core, index = counted
    await core.index_embedded(embedded("acme", "newer", ["new text."], "v2", at=200))
    await core.index_embedded(embedded("acme", "gone", ["kept a while."], "v1", at=100))
    await core.delete_document(_deleted("acme", "gone", at=300))
    before = index.upserts
    bad = embedded("acme", "bad", ["text."])
    bad.chunks[0].chunk.tenant = "other"
    results = await core.index_embedded_many([
        embedded("acme", "a", ["one.", "two."]),
        embedded("globex", "a", ["three."]),
        bad,
        embedded("acme", "newer", ["old text."], "v1", at=100),  # older than the indexed version
        embedded("acme", "gone", ["kept a while."], "v1", at=100),  # deleted since
    ])
    assert index.upserts == before + 1
    a, globex, refused, stale, deleted = results
    assert not isinstance(a, LlmosError) and a is not None and (a.tenant, a.document_id, a.chunk_count) == ("acme", "a", 2)
    assert not isinstance(globex, LlmosError) and globex is not None and globex.chunk_count == 1
    assert isinstance(refused, InvalidArgument)
    assert stale is None and deleted is None
    assert index.count(ChunkFilter("acme", document_ids=("a",))) == 2
    assert index.count(ChunkFilter("globex", document_ids=("a",))) == 1  # tenants kept apart
    newer = await core.get_document("acme", retrieval_pb2.GetDocumentRequest(document_id="newer"))
    assert [chunk.text for chunk in newer.chunks] == ["new text."]
    assert index.count(ChunkFilter("acme", document_ids=("gone",))) == 0
