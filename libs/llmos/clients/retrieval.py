"""Typed calls of the retrieval service, and the one reader of a whole document."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from llmos.clients.base import Metadata, ServiceClient
from llmos.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc

DOCUMENT_PAGE_SIZE = 100


class RetrievalClient(ServiceClient):
    service = "retrieval"

    def __init__(self, channel: grpc.aio.Channel, metadata: Metadata = ()) -> None:
        super().__init__(channel, metadata)
        self._stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)

    async def search(
        self, tenant: str, query: str, top_k: int, timeout_s: float | None,
        mode: retrieval_pb2.SearchMode.ValueType = retrieval_pb2.SEARCH_MODE_HYBRID, vector: Sequence[float] = (),
    ) -> list[retrieval_pb2.ScoredChunk]:
        """The best `top_k` chunks; `vector` is the query's embedding when the caller already has it."""
        request = retrieval_pb2.SearchRequest(tenant=tenant, query=query, top_k=top_k, mode=mode, query_vector=list(vector))
        response = await self._unary(self._stub.Search, request, timeout_s)
        return list(response.hits)

    async def document(self, tenant: str, document_id: str, timeout_s: float | None) -> tuple[str, str]:
        """(title, full text) of an indexed document, read page by page; each page has the whole timeout."""
        chunks: list[common_pb2.Chunk] = []
        title = ""
        token = ""
        while True:
            request = retrieval_pb2.GetDocumentRequest(
                tenant=tenant, document_id=document_id,
                page=common_pb2.PageRequest(page_size=DOCUMENT_PAGE_SIZE, page_token=token),
            )
            response = await self._unary(self._stub.GetDocument, request, timeout_s)
            title = response.title
            chunks.extend(response.chunks)
            token = response.page.next_page_token
            if not token:
                return title, stitch(chunks)


def stitch(chunks: Sequence[common_pb2.Chunk]) -> str:
    """The document text from its overlapping chunks, using their character offsets."""
    text = ""
    for chunk in sorted(chunks, key=lambda chunk: chunk.index):
        overlap = max(0, len(text) - chunk.start_offset) if text else 0
        text += chunk.text[overlap:]
    return text
