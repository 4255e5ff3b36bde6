"""Retrieval as a running service: embedded chunks on the bus become searchable within their
tenant, `docs.indexed` says so, re-submission replaces, deletion removes, bad messages are
dead-lettered; and the whole live flow from SubmitDocument to Search."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from llmos.bus.subjects import CHUNKS_EMBEDDED, DOCS_DELETED, DOCS_INDEXED, dead_letter_subject
from llmos.embedding import EmbeddingModel
from llmos.models import artefact_dir
from llmos.v1 import common_pb2, events_pb2, ingest_pb2, ingest_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from services.ingest.core import chunk_id
from tests.conftest import RunningStack
from tests.grpc_helpers import ADMIN, GLOBEX_USER
from tests.integration.bus_helpers import indexed_events, last_message, last_sequence, publish

pytestmark = pytest.mark.integration

ARTICLES = {
    "returns": ["Returns are free within 30 days of delivery.", "Refunds reach your card within five working days."],
    "shipping": ["Standard shipping takes two to four working days.", "Express delivery arrives the next day."],
    "password": ["Reset your password from the sign-in page with the link we email you."],
}


@pytest.fixture(scope="module")
def embedder(models_home) -> EmbeddingModel:  # type: ignore[no-untyped-def]
    return EmbeddingModel.from_dir(artefact_dir(models_home, "all-minilm-l6-v2"))


def embedded_message(
    model: EmbeddingModel, tenant: str, document_id: str, texts: Sequence[str], content_hash: str, seconds: int = 0
) -> events_pb2.ChunksEmbedded:
    vectors = model.embed(list(texts))
    message = events_pb2.ChunksEmbedded(
        document_id=document_id, tenant=tenant, content_hash=content_hash, model="all-minilm-l6-v2"
    )
    if seconds:
        message.submitted_at.FromSeconds(seconds)
    else:
        message.submitted_at.GetCurrentTime()
    offset = 0
    for index, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
        chunk = common_pb2.Chunk(
            chunk_id=chunk_id(tenant, document_id, index), document_id=document_id, tenant=tenant, index=index, text=text,
            start_offset=offset, end_offset=offset + len(text), title=document_id.title(), source="test", tags=["help"],
        )
        offset += len(text) + 1
        message.chunks.append(events_pb2.EmbeddedChunk(chunk=chunk, vector=vector.tolist()))
    return message


@pytest.fixture
async def retrieval(stack: RunningStack) -> AsyncIterator[retrieval_pb2_grpc.RetrievalServiceStub]:
    async with grpc.aio.insecure_channel(stack.addr("retrieval")) as channel:
        yield retrieval_pb2_grpc.RetrievalServiceStub(channel)


@pytest.fixture(scope="module")
async def knowledge_base(stack: RunningStack, embedder: EmbeddingModel) -> None:
    url = stack.settings.nats_url
    before = await last_sequence(url, DOCS_INDEXED)
    for document_id, texts in ARTICLES.items():
        await publish(url, CHUNKS_EMBEDDED, embedded_message(embedder, "acme", document_id, texts, "v1").SerializeToString())
    globex = embedded_message(embedder, "globex", "globex-returns", ["Globex never accepts returns."], "v1")
    await publish(url, CHUNKS_EMBEDDED, globex.SerializeToString())
    wanted = {("acme", doc) for doc in ARTICLES} | {("globex", "globex-returns")}
    events = await indexed_events(url, before, wanted)
    counts = {event.document_id: event.chunk_count for event in events if (event.tenant, event.document_id) in wanted}
    assert counts == {"returns": 2, "shipping": 2, "password": 1, "globex-returns": 1}


@pytest.mark.parametrize("mode", [retrieval_pb2.SEARCH_MODE_HYBRID, retrieval_pb2.SEARCH_MODE_DENSE, retrieval_pb2.SEARCH_MODE_SPARSE])
async def test_search_finds_the_answer_within_the_callers_tenant(knowledge_base, retrieval, mode: int) -> None:  # type: ignore[no-untyped-def]
    response = await retrieval.Search(retrieval_pb2.SearchRequest(query="when will the refund reach my card", mode=mode, top_k=3), metadata=ADMIN)
    top = response.hits[0].chunk
    assert (top.document_id, top.tenant) == ("returns", "acme")
    assert top.text == ARTICLES["returns"][1] and top.title == "Returns" and top.end_offset > top.start_offset
    assert all(hit.chunk.tenant == "acme" for hit in response.hits)
    globex = await retrieval.Search(retrieval_pb2.SearchRequest(query="refunds returns", mode=mode), metadata=GLOBEX_USER)
    assert {hit.chunk.document_id for hit in globex.hits} == {"globex-returns"}


async def test_cross_tenant_search_is_refused(knowledge_base, retrieval) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await retrieval.Search(retrieval_pb2.SearchRequest(query="returns", tenant="acme"), metadata=GLOBEX_USER)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"query": ""}, "query"), ({"query": "x", "top_k": 5000}, "top_k"), ({"query": "x" * 5000}, "query")],
)
async def test_bad_searches_are_invalid_argument(retrieval, fields: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await retrieval.Search(retrieval_pb2.SearchRequest(**fields), metadata=ADMIN)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()


async def test_resubmission_replaces_and_delete_removes(stack: RunningStack, embedder, retrieval) -> None:  # type: ignore[no-untyped-def]
    url = stack.settings.nats_url
    before = await last_sequence(url, DOCS_INDEXED)
    old = embedded_message(embedder, "acme", "hours", ["We open at 9.", "We close at 5.", "Closed on Sundays."], "v1", seconds=1000)
    await publish(url, CHUNKS_EMBEDDED, old.SerializeToString())
    await indexed_events(url, before, {("acme", "hours")})
    before = await last_sequence(url, DOCS_INDEXED)
    new = embedded_message(embedder, "acme", "hours", ["We open every day from 8 to 8."], "v2", seconds=2000)
    await publish(url, CHUNKS_EMBEDDED, new.SerializeToString())
    (event,) = [event for event in await indexed_events(url, before, {("acme", "hours")}) if event.document_id == "hours"]
    assert (event.content_hash, event.chunk_count) == ("v2", 1)
    document = await retrieval.GetDocument(retrieval_pb2.GetDocumentRequest(document_id="hours"), metadata=ADMIN)
    assert [chunk.text for chunk in document.chunks] == ["We open every day from 8 to 8."]

    await publish(url, DOCS_DELETED, events_pb2.DocumentDeleted(document_id="hours", tenant="acme").SerializeToString())
    for _ in range(100):
        try:
            await retrieval.GetDocument(retrieval_pb2.GetDocumentRequest(document_id="hours"), metadata=ADMIN)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the deleted document is still served")


async def test_a_delete_wins_over_a_version_still_being_embedded(stack: RunningStack, embedder, retrieval) -> None:  # type: ignore[no-untyped-def]
    """The version submitted before a delete reaches retrieval after it: it stays deleted, and a
    later re-submission brings the document back."""
    url = stack.settings.nats_url
    request = retrieval_pb2.GetDocumentRequest(document_id="raced")
    before = await last_sequence(url, DOCS_INDEXED)
    await publish(url, CHUNKS_EMBEDDED, embedded_message(embedder, "acme", "raced", ["Version one."], "v1", seconds=1000).SerializeToString())
    await indexed_events(url, before, {("acme", "raced")})
    deleted = events_pb2.DocumentDeleted(document_id="raced", tenant="acme")
    deleted.deleted_at.FromSeconds(3000)
    await publish(url, DOCS_DELETED, deleted.SerializeToString())
    for _ in range(100):
        try:
            await retrieval.GetDocument(request, metadata=ADMIN)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the delete was not applied")

    # Submitted (2000) before the delete (3000), embedded after it; a marker document follows in the same lane.
    before = await last_sequence(url, DOCS_INDEXED)
    late = embedded_message(embedder, "acme", "raced", ["Version two, late."], "v2", seconds=2000)
    await publish(url, CHUNKS_EMBEDDED, late.SerializeToString())
    await publish(url, CHUNKS_EMBEDDED, embedded_message(embedder, "acme", "after-race", ["Marker."], "v1").SerializeToString())
    events = await indexed_events(url, before, {("acme", "after-race")})
    assert ("acme", "raced") not in {(event.tenant, event.document_id) for event in events}
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await retrieval.GetDocument(request, metadata=ADMIN)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    before = await last_sequence(url, DOCS_INDEXED)
    again = embedded_message(embedder, "acme", "raced", ["Version three, re-submitted."], "v3", seconds=4000)
    await publish(url, CHUNKS_EMBEDDED, again.SerializeToString())
    await indexed_events(url, before, {("acme", "raced")})
    document = await retrieval.GetDocument(request, metadata=ADMIN)
    assert [chunk.text for chunk in document.chunks] == ["Version three, re-submitted."]


async def test_document_pages_and_recommendations(knowledge_base, retrieval) -> None:  # type: ignore[no-untyped-def]
    first = await retrieval.GetDocument(
        retrieval_pb2.GetDocumentRequest(document_id="returns", user_id="ann", page=common_pb2.PageRequest(page_size=1)),
        metadata=ADMIN,
    )
    assert first.chunk_count == 2 and [c.index for c in first.chunks] == [0] and first.page.next_page_token
    second = await retrieval.GetDocument(
        retrieval_pb2.GetDocumentRequest(document_id="returns", page=common_pb2.PageRequest(page_size=1, page_token=first.page.next_page_token)),
        metadata=ADMIN,
    )
    assert [c.index for c in second.chunks] == [1] and not second.page.next_page_token
    response = await retrieval.Recommend(retrieval_pb2.RecommendRequest(user_id="ann", top_k=2), metadata=ADMIN)
    ids = [rec.document_id for rec in response.recommendations]
    assert ids and "returns" not in ids and "globex-returns" not in ids
    assert all(rec.reason == "similar to Returns" for rec in response.recommendations)


async def test_a_poisoned_message_is_dead_lettered_and_the_service_goes_on(stack: RunningStack, embedder, retrieval) -> None:  # type: ignore[no-untyped-def]
    url = stack.settings.nats_url
    dlq = dead_letter_subject(CHUNKS_EMBEDDED)
    before = await last_sequence(url, dlq)
    bad = embedded_message(embedder, "acme", "bad-vector", ["Text."], "v1")
    del bad.chunks[0].vector[10:]
    await publish(url, CHUNKS_EMBEDDED, bad.SerializeToString())
    letter = events_pb2.DeadLetter.FromString((await last_message(url, dlq, after_seq=before, timeout_s=20)).data)
    assert letter.service == "retrieval" and "has 10 dimensions" in letter.error
    indexed_before = await last_sequence(url, DOCS_INDEXED)
    await publish(url, CHUNKS_EMBEDDED, embedded_message(embedder, "acme", "after-poison", ["Still working."], "v1").SerializeToString())
    await indexed_events(url, indexed_before, {("acme", "after-poison")})


async def test_live_flow_from_submit_to_search(stack: RunningStack, retrieval) -> None:  # type: ignore[no-untyped-def]
    """ingest → inference (embeds) → retrieval (indexes) → docs.indexed, status INDEXED, searchable."""
    url = stack.settings.nats_url
    before = await last_sequence(url, DOCS_INDEXED)
    async with grpc.aio.insecure_channel(stack.addr("ingest")) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        await ingest.SubmitDocument(
            ingest_pb2.SubmitDocumentRequest(
                document_id="gift-cards", title="Gift cards", priority=common_pb2.PRIORITY_INTERACTIVE,
                content=b"Gift cards never expire and can be used online or in any of our stores.",
            ),
            metadata=ADMIN,
        )
        await indexed_events(url, before, {("acme", "gift-cards")})
        for _ in range(50):
            status = await ingest.GetDocumentStatus(ingest_pb2.GetDocumentStatusRequest(document_id="gift-cards"), metadata=ADMIN)
            if status.stage == common_pb2.DOCUMENT_STAGE_INDEXED:
                break
            await asyncio.sleep(0.1)
        assert status.stage == common_pb2.DOCUMENT_STAGE_INDEXED and status.chunk_count == 1
    # Other tests index the demo help centre into the same tenant, with its own gift-card article.
    response = await retrieval.Search(retrieval_pb2.SearchRequest(query="do gift cards expire?", top_k=3), metadata=ADMIN)
    assert "gift-cards" in [hit.chunk.document_id for hit in response.hits]
