"""Ingest over gRPC: chunks on the bus, status, de-duplication, deletion and bad input."""

from __future__ import annotations

import asyncio
import contextlib

from collections.abc import AsyncIterator

import nats
import pytest

from llmos.bus.follow import follow
from llmos.bus.subjects import (
    CHUNKS_CREATED,
    CHUNKS_EMBEDDED,
    DOCS_DELETED,
    DOCS_FAILED,
    DOCS_INDEXED,
    INGEST_REQUESTED,
)
from llmos.clients import IngestClient
from llmos.errors import InvalidArgument, NotFound, PermissionDenied
from llmos.v1 import common_pb2, events_pb2, ingest_pb2
from tests.conftest import RunningStack
from tests.grpc_helpers import GLOBEX_USER, connected
from tests.integration.bus_helpers import indexed_events, last_message, last_sequence, publish
from tests.pdf_helpers import minimal_pdf

pytestmark = pytest.mark.integration

ARTICLE = (
    "Returns are free within 30 days of delivery. Pack the item in its original box and print the label "
    "from your account page. Refunds reach your card within five working days after we receive the parcel. "
) * 20


@pytest.fixture
async def ingest(stack: RunningStack) -> AsyncIterator[IngestClient]:
    async with connected(stack, IngestClient) as client:
        yield client


async def test_submitted_document_is_chunked_onto_the_bus(ingest: IngestClient, stack: RunningStack) -> None:
    url = stack.settings.nats_url
    before = await last_sequence(url, CHUNKS_CREATED)
    response = await ingest.submit(
        ingest_pb2.SubmitDocumentRequest(document_id="returns", title="Returns policy", content=ARTICLE.encode(),
                                         mime_type="text/plain", tags=["policy"]),
    )
    assert response.stage == common_pb2.DOCUMENT_STAGE_CHUNKED and not response.unchanged
    created = events_pb2.ChunksCreated.FromString((await last_message(url, CHUNKS_CREATED, after_seq=before)).data)
    assert created.document_id == "returns" and created.tenant == "acme"
    assert len(created.chunks) > 1
    assert all(0 < chunk.token_count <= 256 for chunk in created.chunks)
    assert [chunk.index for chunk in created.chunks] == list(range(len(created.chunks)))
    assert created.chunks[0].text.startswith("Returns are free")
    assert all(chunk.tags == ["policy"] and chunk.title == "Returns policy" for chunk in created.chunks)

    status = await ingest.status("returns")
    assert status.stage == common_pb2.DOCUMENT_STAGE_CHUNKED and status.chunk_count == len(created.chunks)

    again = await ingest.submit(ingest_pb2.SubmitDocumentRequest(document_id="returns", content=ARTICLE.encode()))
    assert again.unchanged and again.content_hash == response.content_hash


async def test_documents_are_confined_to_their_tenant(ingest: IngestClient) -> None:
    await ingest.submit(ingest_pb2.SubmitDocumentRequest(document_id="secret", content=b"acme only"))
    globex = ingest.with_credentials(GLOBEX_USER)
    with pytest.raises(NotFound):
        await globex.status("secret")
    with pytest.raises(PermissionDenied):
        await globex.status("secret", tenant="acme")


async def test_delete_publishes_and_marks_the_document(ingest: IngestClient, stack: RunningStack) -> None:
    url = stack.settings.nats_url
    await ingest.submit(ingest_pb2.SubmitDocumentRequest(document_id="to-delete", content=b"short lived"))
    before = await last_sequence(url, DOCS_DELETED)
    assert await ingest.delete("to-delete")
    deleted = events_pb2.DocumentDeleted.FromString((await last_message(url, DOCS_DELETED, after_seq=before)).data)
    assert (deleted.document_id, deleted.tenant) == ("to-delete", "acme")
    assert (await ingest.status("to-delete")).stage == common_pb2.DOCUMENT_STAGE_DELETED
    with pytest.raises(NotFound):
        await ingest.delete("never-existed")


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"content": b""}, "content: the document is empty"),
        ({"content": b"   \n\t "}, "no text"),
        ({"content": b"\xff\xfe bad"}, "not valid UTF-8"),
        ({"content": b"%PDF", "mime_type": "application/x-unknown"}, "mime_type"),
        ({"content": b"%PDF-1.4 broken", "mime_type": "application/pdf"}, "not a readable PDF"),
        ({"content": b"x" * (4 * 1024 * 1024 + 1)}, "over the limit"),
    ],
)
async def test_bad_documents_are_invalid_argument(ingest: IngestClient, request_fields: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidArgument) as error:
        await ingest.submit(ingest_pb2.SubmitDocumentRequest(document_id="bad", **request_fields))
    assert message in error.value.message


async def test_html_pdf_and_pii_reach_the_chunks_cleaned(ingest: IngestClient, stack: RunningStack) -> None:
    url = stack.settings.nats_url
    page = (
        b"<html><body><nav>Home | Orders</nav><main><h1>Contact</h1><p>Mail help@acme.example or call "
        b"+44 20 7946 0958. Card 4111 1111 1111 1111 on file.</p></main><footer>Acme Ltd</footer></body></html>"
    )
    before = await last_sequence(url, CHUNKS_CREATED)
    await ingest.submit(ingest_pb2.SubmitDocumentRequest(document_id="contact", content=page, mime_type="text/html"))
    created = events_pb2.ChunksCreated.FromString((await last_message(url, CHUNKS_CREATED, after_seq=before)).data)
    assert created.chunks[0].text == "Contact\n\nMail [EMAIL] or call [PHONE]. Card [CARD] on file."

    before = await last_sequence(url, CHUNKS_CREATED)
    pdf = minimal_pdf(["Warranty lasts two years.", "Pay to GB82 WEST 1234 5698 7654 32."])
    await ingest.submit(ingest_pb2.SubmitDocumentRequest(document_id="warranty", content=pdf, mime_type="application/pdf"))
    created = events_pb2.ChunksCreated.FromString((await last_message(url, CHUNKS_CREATED, after_seq=before)).data)
    assert created.chunks[0].text == "Warranty lasts two years.\nPay to [IBAN]."


async def test_corrupt_pdf_on_the_bus_is_reported_and_dead_lettered(stack: RunningStack) -> None:
    url = stack.settings.nats_url
    failed_before = await last_sequence(url, DOCS_FAILED)
    dlq = "llmos.dlq." + INGEST_REQUESTED
    dlq_before = await last_sequence(url, dlq)
    document = events_pb2.DocumentSubmitted(
        document_id="broken-pdf", tenant="acme", mime_type="application/pdf", content=b"%PDF-1.7 truncated"
    )
    await publish(url, INGEST_REQUESTED, document.SerializeToString())
    failed = events_pb2.DocumentFailed.FromString((await last_message(url, DOCS_FAILED, after_seq=failed_before)).data)
    assert failed.document_id == "broken-pdf" and "not a readable PDF" in failed.reason
    letter = events_pb2.DeadLetter.FromString((await last_message(url, dlq, after_seq=dlq_before)).data)
    assert "not a readable PDF" in letter.error


async def test_later_stages_move_the_status_forward_for_current_content_only(ingest: IngestClient, stack: RunningStack) -> None:
    url = stack.settings.nats_url
    submitted = await ingest.submit(ingest_pb2.SubmitDocumentRequest(document_id="tracked", content=b"Tracked document text."))

    async def stage() -> int:
        return (await ingest.status("tracked")).stage

    async def wait_for(expected: int) -> None:
        """At least `expected`: the live pipeline (inference, retrieval) reports too, and may be ahead."""
        for _ in range(100):
            if await stage() >= expected:
                return
            await asyncio.sleep(0.05)
        assert await stage() >= expected

    stale = events_pb2.DocumentIndexed(document_id="tracked", tenant="acme", content_hash="an-older-version", chunk_count=9)
    await publish(url, DOCS_INDEXED, stale.SerializeToString())
    embedded = events_pb2.ChunksEmbedded(document_id="tracked", tenant="acme", content_hash=submitted.content_hash)
    await publish(url, CHUNKS_EMBEDDED, embedded.SerializeToString())
    await wait_for(common_pb2.DOCUMENT_STAGE_EMBEDDED)
    indexed = events_pb2.DocumentIndexed(document_id="tracked", tenant="acme", content_hash=submitted.content_hash, chunk_count=1)
    await publish(url, DOCS_INDEXED, indexed.SerializeToString())
    await wait_for(common_pb2.DOCUMENT_STAGE_INDEXED)
    await publish(url, CHUNKS_EMBEDDED, embedded.SerializeToString(), headers={"Nats-Msg-Id": "late-embedded-report"})
    await asyncio.sleep(0.5)
    assert await stage() == common_pb2.DOCUMENT_STAGE_INDEXED  # a late report never moves it back


async def test_interactive_documents_skip_the_bulk_backlog(stack: RunningStack) -> None:
    url = stack.settings.nats_url
    before = await last_sequence(url, CHUNKS_CREATED)
    indexed_before = await last_sequence(url, DOCS_INDEXED)
    bulk_text = ("Bulk catalogue entry about garden furniture and its care. " * 60).encode()
    live = events_pb2.DocumentSubmitted(
        document_id="live-update", tenant="acme", content=b"Store closes at 6 pm today.", priority=common_pb2.PRIORITY_INTERACTIVE
    )
    connection = await nats.connect(url)
    try:
        js = connection.jetstream()
        for number in range(200):
            bulk = events_pb2.DocumentSubmitted(
                document_id=f"bulk-{number}", tenant="acme", content=bulk_text + str(number).encode(),
                priority=common_pb2.PRIORITY_BATCH,
            )
            await js.publish(INGEST_REQUESTED, bulk.SerializeToString())
        await js.publish(INGEST_REQUESTED, live.SerializeToString())
    finally:
        await connection.close()
    connection = await nats.connect(url)
    try:
        js = connection.jetstream()
        order: list[str] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                async for message in follow(js, CHUNKS_CREATED, before):
                    order.append(events_pb2.ChunksCreated.FromString(message.data).document_id)
                    if order[-1] == "live-update":
                        break
    finally:
        await connection.close()
    assert "live-update" in order
    # The live document was chunked while most of the backlog still waited.
    assert len([doc for doc in order if doc.startswith("bulk-")]) < 150, order
    # The backlog is drained before the next tests share this stack's bus.
    await indexed_events(url, indexed_before, {("acme", f"bulk-{number}") for number in range(200)}, timeout_s=300)

