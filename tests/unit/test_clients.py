"""The typed clients (llmos.clients) against a real gRPC server in this process, and deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from llmos.clients import RetrievalClient, stitch
from llmos.deadline import Deadline, timeout_within
from llmos.errors import DeadlineExceeded, NotFound
from llmos.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from services.dialogue.backends import GrpcRetriever
from services.speech.app import document_reader

pytestmark = pytest.mark.unit

TEXT = "Boots may be returned within thirty days. Refunds reach the card in five days. Sale items are final."
# Three chunks of 40 characters overlapping by 10, served two to a page.
CHUNKS = [
    common_pb2.Chunk(document_id="returns", index=index, text=TEXT[start:start + 40], start_offset=start)
    for index, start in enumerate(range(0, len(TEXT) - 10, 30))
]


class PagedDocuments(retrieval_pb2_grpc.RetrievalServiceServicer):
    """GetDocument of one document, two chunks a page; any other document is not found."""

    async def GetDocument(
        self, request: retrieval_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.GetDocumentResponse:
        if request.document_id != "returns":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no document {request.document_id}")
        start = int(request.page.page_token or 0)
        token = str(start + 2) if start + 2 < len(CHUNKS) else ""
        return retrieval_pb2.GetDocumentResponse(
            document_id="returns", title="Returns", chunks=CHUNKS[start:start + 2], page=common_pb2.PageResponse(next_page_token=token)
        )


@pytest.fixture
async def retrieval() -> AsyncIterator[RetrievalClient]:
    server = grpc.aio.server()
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(PagedDocuments(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield RetrievalClient(channel)
    await server.stop(None)


def test_chunks_are_stitched_without_their_overlap() -> None:
    text = "abcdefghijklmnopqrstuvwxyz"
    chunks = [common_pb2.Chunk(index=1, text=text[8:20], start_offset=8), common_pb2.Chunk(index=0, text=text[:12], start_offset=0)]
    assert stitch(chunks) == text[:20]


async def test_dialogue_and_speech_read_a_document_the_same_way(retrieval: RetrievalClient) -> None:
    title, dialogue_text = await GrpcRetriever(retrieval).document("acme", "returns", 5.0)
    speech_text = await document_reader(retrieval)("acme", "returns")
    assert title == "Returns"
    assert dialogue_text == speech_text == TEXT  # every page read, each overlap once


async def test_a_failed_call_is_the_platform_error_named_after_the_service(retrieval: RetrievalClient) -> None:
    with pytest.raises(NotFound, match="^retrieval: no document missing"):
        await retrieval.document("acme", "missing", 5.0)


async def test_a_deadline_gives_each_call_the_time_left_and_fails_once_passed() -> None:
    assert timeout_within(None, 7.0) == 7.0
    assert 0.0 < timeout_within(Deadline.after(5.0), 7.0) <= 5.0
    passed = Deadline.after(0.01)
    await asyncio.sleep(0.02)
    assert passed.expired
    with pytest.raises(DeadlineExceeded):
        timeout_within(passed, 7.0)
