"""Ingest over gRPC: chunks on the bus, status, de-duplication, deletion and bad input."""

from __future__ import annotations

import grpc
import pytest

from llmos.bus.subjects import CHUNKS_CREATED, DOCS_DELETED
from llmos.v1 import common_pb2, events_pb2, ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningStack
from tests.grpc_helpers import ADMIN, GLOBEX_USER
from tests.integration.bus_helpers import last_message, last_sequence

pytestmark = pytest.mark.integration

ARTICLE = (
    "Returns are free within 30 days of delivery. Pack the item in its original box and print the label "
    "from your account page. Refunds reach your card within five working days after we receive the parcel. "
) * 20


@pytest.fixture
async def ingest(stack: RunningStack):  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(stack.addr("ingest")) as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel)


async def test_submitted_document_is_chunked_onto_the_bus(ingest, stack: RunningStack) -> None:  # type: ignore[no-untyped-def]
    url = stack.settings.nats_url
    before = await last_sequence(url, CHUNKS_CREATED)
    response = await ingest.SubmitDocument(
        ingest_pb2.SubmitDocumentRequest(document_id="returns", title="Returns policy", content=ARTICLE.encode(),
                                         mime_type="text/plain", tags=["policy"]),
        metadata=ADMIN,
    )
    assert response.stage == common_pb2.DOCUMENT_STAGE_CHUNKED and not response.unchanged
    created = events_pb2.ChunksCreated.FromString((await last_message(url, CHUNKS_CREATED, after_seq=before)).data)
    assert created.document_id == "returns" and created.tenant == "acme"
    assert len(created.chunks) > 1
    assert all(0 < chunk.token_count <= 256 for chunk in created.chunks)
    assert [chunk.index for chunk in created.chunks] == list(range(len(created.chunks)))
    assert created.chunks[0].text.startswith("Returns are free")
    assert all(chunk.tags == ["policy"] and chunk.title == "Returns policy" for chunk in created.chunks)

    status = await ingest.GetDocumentStatus(ingest_pb2.GetDocumentStatusRequest(document_id="returns"), metadata=ADMIN)
    assert status.stage == common_pb2.DOCUMENT_STAGE_CHUNKED and status.chunk_count == len(created.chunks)

    again = await ingest.SubmitDocument(
        ingest_pb2.SubmitDocumentRequest(document_id="returns", content=ARTICLE.encode()), metadata=ADMIN
    )
    assert again.unchanged and again.content_hash == response.content_hash


async def test_documents_are_confined_to_their_tenant(ingest) -> None:  # type: ignore[no-untyped-def]
    await ingest.SubmitDocument(ingest_pb2.SubmitDocumentRequest(document_id="secret", content=b"acme only"), metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await ingest.GetDocumentStatus(ingest_pb2.GetDocumentStatusRequest(document_id="secret"), metadata=GLOBEX_USER)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await ingest.GetDocumentStatus(
            ingest_pb2.GetDocumentStatusRequest(document_id="secret", tenant="acme"), metadata=GLOBEX_USER
        )
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_delete_publishes_and_marks_the_document(ingest, stack: RunningStack) -> None:  # type: ignore[no-untyped-def]
    url = stack.settings.nats_url
    await ingest.SubmitDocument(ingest_pb2.SubmitDocumentRequest(document_id="to-delete", content=b"short lived"), metadata=ADMIN)
    before = await last_sequence(url, DOCS_DELETED)
    response = await ingest.DeleteDocument(ingest_pb2.DeleteDocumentRequest(document_id="to-delete"), metadata=ADMIN)
    assert response.deleted
    deleted = events_pb2.DocumentDeleted.FromString((await last_message(url, DOCS_DELETED, after_seq=before)).data)
    assert (deleted.document_id, deleted.tenant) == ("to-delete", "acme")
    status = await ingest.GetDocumentStatus(ingest_pb2.GetDocumentStatusRequest(document_id="to-delete"), metadata=ADMIN)
    assert status.stage == common_pb2.DOCUMENT_STAGE_DELETED
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await ingest.DeleteDocument(ingest_pb2.DeleteDocumentRequest(document_id="never-existed"), metadata=ADMIN)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"content": b""}, "content: the document is empty"),
        ({"content": b"   \n\t "}, "no text"),
        ({"content": b"\xff\xfe bad"}, "not valid UTF-8"),
        ({"content": b"%PDF", "mime_type": "application/x-unknown"}, "mime_type"),
    ],
)
async def test_bad_documents_are_invalid_argument(ingest, request_fields: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await ingest.SubmitDocument(ingest_pb2.SubmitDocumentRequest(document_id="bad", **request_fields), metadata=ADMIN)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
