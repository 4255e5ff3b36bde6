"""Typed calls of the retrieval service, and the one reader of a whole document."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmos.clients.base import ServiceClient
from llmos.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc

DOCUMENT_PAGE_SIZE = 100


@dataclass(frozen=True)
class Document:
    """An indexed document with all its chunks, in order."""

    document_id: str
    title: str
    source: str
    tags: list[str]
    chunks: list[common_pb2.Chunk]

    @property
    def text(self) -> str:
        return stitch(self.chunks)


class RetrievalClient(ServiceClient[retrieval_pb2_grpc.RetrievalServiceStub]):
    service = "retrieval"
    stub_type = retrieval_pb2_grpc.RetrievalServiceStub

    async def search(
        self, tenant: str, query: str, top_k: int, timeout_s: float | None,
        mode: retrieval_pb2.SearchMode.ValueType = retrieval_pb2.SEARCH_MODE_HYBRID, vector: Sequence[float] = (),
        search_filter: retrieval_pb2.SearchFilter | None = None, user_id: str = "",
    ) -> list[retrieval_pb2.ScoredChunk]:
        """The best `top_k` chunks, best first; `vector` is the query's embedding when the caller
        already has it; with `user_id` the query is remembered for that user's recommendations."""
        request = retrieval_pb2.SearchRequest(
            tenant=tenant, query=query, top_k=top_k, mode=mode, query_vector=list(vector), filter=search_filter, user_id=user_id
        )
        response = await self._unary(self._stub.Search, request, timeout_s)
        return list(response.hits)

    async def recommend(
        self, user_id: str, *, tenant: str = "", top_k: int = 0, include_seen: bool = False, timeout_s: float | None = None
    ) -> list[retrieval_pb2.Recommendation]:
        """Documents for `user_id` from what they searched and read, best first."""
        request = retrieval_pb2.RecommendRequest(tenant=tenant, user_id=user_id, top_k=top_k, include_seen=include_seen)
        return list((await self._unary(self._stub.Recommend, request, timeout_s)).recommendations)

    async def document_page(
        self, tenant: str, document_id: str, *, page_size: int = DOCUMENT_PAGE_SIZE, page_token: str = "", user_id: str = "",
        timeout_s: float | None = None,
    ) -> retrieval_pb2.GetDocumentResponse:
        """One page of a document's chunks; `page.next_page_token` names the next (empty: the last)."""
        request = retrieval_pb2.GetDocumentRequest(
            tenant=tenant, document_id=document_id, user_id=user_id,
            page=common_pb2.PageRequest(page_size=page_size, page_token=page_token),
        )
        return await self._unary(self._stub.GetDocument, request, timeout_s)

    async def read_document(
        self, tenant: str, document_id: str, *, user_id: str = "", timeout_s: float | None = None
    ) -> Document:
        """The whole document, read page by page; each page has the whole timeout."""
        chunks: list[common_pb2.Chunk] = []
        token = ""
        while True:
            # The read is recorded for `user_id` once, with the first page.
            page = await self.document_page(
                tenant, document_id, page_token=token, user_id="" if token else user_id, timeout_s=timeout_s
            )
            chunks.extend(page.chunks)
            token = page.page.next_page_token
            if not token:
                return Document(page.document_id, page.title, page.source, list(page.tags), sorted(chunks, key=lambda chunk: chunk.index))

    async def document(self, tenant: str, document_id: str, timeout_s: float | None) -> tuple[str, str]:
        """(title, full text) of an indexed document."""
        document = await self.read_document(tenant, document_id, timeout_s=timeout_s)
        return document.title, document.text


def stitch(chunks: Sequence[common_pb2.Chunk]) -> str:
    """The document text from its overlapping chunks, using their character offsets."""
    text = ""
    for chunk in sorted(chunks, key=lambda chunk: chunk.index):
        overlap = max(0, len(text) - chunk.start_offset) if text else 0
        text += chunk.text[overlap:]
    return text
