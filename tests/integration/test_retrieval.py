"""Retrieval as a running service: embedded chunks on the bus become searchable within their
tenant, `docs.indexed` says so, re-submission replaces, deletion removes, bad messages are
dead-lettered; and the whole live flow from SubmitDocument to Search."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from llmos.bus.subjects import CHUNKS_EMBEDDED, DOCS_DELETED, DOCS_INDEXED, dead_letter_subject
from llmos.clients import IngestClient, RetrievalClient
from llmos.embedding import EmbeddingModel
from llmos.errors import InvalidArgument, NotFound, PermissionDenied
from llmos.models import artefact_dir
from llmos.v1 import common_pb2, events_pb2, ingest_pb2, retrieval_pb2
from services.ingest.core import chunk_id
from tests.conftest import RunningStack
from tests.grpc_helpers import GLOBEX_USER, connected
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
async def retrieval(stack: RunningStack) -> AsyncIterator[RetrievalClient]:
    async with connected(stack, RetrievalClient) as client:
        yield client


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
async def test_search_finds_the_answer_within_the_callers_tenant(knowledge_base, retrieval: RetrievalClient, mode: int) -> None:  # type: ignore[no-untyped-def]
    hits = await retrieval.search("", "when will the refund reach my card", 3, None, mode)
    top = hits[0].chunk
    assert (top.document_id, top.tenant) == ("returns", "acme")
    assert top.text == ARTICLES["returns"][1] and top.title == "Returns" and top.end_offset > top.start_offset
    assert all(hit.chunk.tenant == "acme" for hit in hits)
    globex = await retrieval.with_credentials(GLOBEX_USER).search("", "refunds returns", 0, None, mode)
    assert {hit.chunk.document_id for hit in globex} == {"globex-returns"}


async def test_cross_tenant_search_is_refused(knowledge_base, retrieval: RetrievalClient) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PermissionDenied):
        await retrieval.with_credentials(GLOBEX_USER).search("acme", "returns", 0, None)


@pytest.mark.parametrize(("query", "top_k", "message"), [("", 0, "query"), ("x", 5000, "top_k"), ("x" * 5000, 0, "query")])
async def test_bad_searches_are_invalid_argument(retrieval: RetrievalClient, query: str, top_k: int, message: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        await retrieval.search("", query, top_k, None)
    assert message in error.value.message


async def test_resubmission_replaces_and_delete_removes(stack: RunningStack, embedder, retrieval: RetrievalClient) -> None:  # type: ignore[no-untyped-def]
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
    document = await retrieval.read_document("", "hours")
    assert [chunk.text for chunk in document.chunks] == ["We open every day from 8 to 8."]

    await publish(url, DOCS_DELETED, events_pb2.DocumentDeleted(document_id="hours", tenant="acme").SerializeToString())
    for _ in range(100):
        try:
            await retrieval.read_document("", "hours")
        except NotFound:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the deleted document is still served")


async def test_a_delete_wins_over_a_version_still_being_embedded(stack: RunningStack, embedder, retrieval: RetrievalClient) -> None:  # type: ignore[no-untyped-def]
    """The version submitted before a delete reaches retrieval after it: it stays deleted, and a
    later re-submission brings the document back."""
    url = stack.settings.nats_url
    before = await last_sequence(url, DOCS_INDEXED)
    await publish(url, CHUNKS_EMBEDDED, embedded_message(embedder, "acme", "raced", ["Version one."], "v1", seconds=1000).SerializeToString())
    await indexed_events(url, before, {("acme", "raced")})
    deleted = events_pb2.DocumentDeleted(document_id="raced", tenant="acme")
    deleted.deleted_at.FromSeconds(3000)
    await publish(url, DOCS_DELETED, deleted.SerializeToString())
    for _ in range(100):
        try:
            await retrieval.read_document("", "raced")
        except NotFound:
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
    with pytest.raises(NotFound):
        await retrieval.read_document("", "raced")

    before = await last_sequence(url, DOCS_INDEXED)
    again = embedded_message(embedder, "acme", "raced", ["Version three, re-submitted."], "v3", seconds=4000)
    await publish(url, CHUNKS_EMBEDDED, again.SerializeToString())
    await indexed_events(url, before, {("acme", "raced")})
    document = await retrieval.read_document("", "raced")
    assert [chunk.text for chunk in document.chunks] == ["Version three, re-submitted."]


async def test_document_pages_and_recommendations(knowledge_base, retrieval: RetrievalClient) -> None:  # type: ignore[no-untyped-def]
    first = await retrieval.document_page("", "returns", user_id="ann", page_size=1)
    assert first.chunk_count == 2 and [c.index for c in first.chunks] == [0] and first.page.next_page_token
    second = await retrieval.document_page("", "returns", page_size=1, page_token=first.page.next_page_token)
    assert [c.index for c in second.chunks] == [1] and not second.page.next_page_token
    recommendations = await retrieval.recommend("ann", top_k=2)
    ids = [rec.document_id for rec in recommendations]
    assert ids and "returns" not in ids and "globex-returns" not in ids
    assert all(rec.reason == "similar to Returns" for rec in recommendations)


async def test_a_poisoned_message_is_dead_lettered_and_the_service_goes_on(stack: RunningStack, embedder, retrieval: RetrievalClient) -> None:  # type: ignore[no-untyped-def]
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


async def test_live_flow_from_submit_to_search(stack: RunningStack, retrieval: RetrievalClient) -> None:  # type: ignore[no-untyped-def]
    """ingest → inference (embeds) → retrieval (indexes) → docs.indexed, status INDEXED, searchable."""
    url = stack.settings.nats_url
    before = await last_sequence(url, DOCS_INDEXED)
    async with connected(stack, IngestClient) as ingest:
        await ingest.submit(
            ingest_pb2.SubmitDocumentRequest(
                document_id="gift-cards", title="Gift cards", priority=common_pb2.PRIORITY_INTERACTIVE,
                content=b"Gift cards never expire and can be used online or in any of our stores.",
            ),
        )
        await indexed_events(url, before, {("acme", "gift-cards")})
        status = (await ingest.wait_until_settled(["gift-cards"], within_s=5, poll_s=0.1))["gift-cards"]
        assert status.stage == common_pb2.DOCUMENT_STAGE_INDEXED and status.chunk_count == 1
    # Other tests index the demo help centre into the same tenant, with its own gift-card article.
    hits = await retrieval.search("", "do gift cards expire?", 3, None)
    assert "gift-cards" in [hit.chunk.document_id for hit in hits]
