"""Typed calls of the ingest service: submit, follow and delete documents."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable

from llmos.clients.base import ServiceClient
from llmos.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

LIST_PAGE_SIZE = 100
# Stages a document does not leave by itself.
SETTLED = frozenset({common_pb2.DOCUMENT_STAGE_INDEXED, common_pb2.DOCUMENT_STAGE_FAILED, common_pb2.DOCUMENT_STAGE_DELETED})


class IngestClient(ServiceClient[ingest_pb2_grpc.IngestServiceStub]):
    service = "ingest"
    stub_type = ingest_pb2_grpc.IngestServiceStub

    async def submit(
        self, request: ingest_pb2.SubmitDocumentRequest, *, timeout_s: float | None = None
    ) -> ingest_pb2.SubmitDocumentResponse:
        """Accept a document (or a new version of one) for chunking and indexing."""
        return await self._unary(self._stub.SubmitDocument, request, timeout_s)

    async def status(self, document_id: str, *, tenant: str = "", timeout_s: float | None = None) -> ingest_pb2.DocumentStatus:
        """Where the document stands in the pipeline."""
        request = ingest_pb2.GetDocumentStatusRequest(tenant=tenant, document_id=document_id)
        return await self._unary(self._stub.GetDocumentStatus, request, timeout_s)

    async def delete(self, document_id: str, *, tenant: str = "", timeout_s: float | None = None) -> bool:
        """Remove the document and its chunks; whether there was one to delete."""
        request = ingest_pb2.DeleteDocumentRequest(tenant=tenant, document_id=document_id)
        return (await self._unary(self._stub.DeleteDocument, request, timeout_s)).deleted

    async def documents_page(
        self, *, tenant: str = "", stage: common_pb2.DocumentStage.ValueType = common_pb2.DOCUMENT_STAGE_UNSPECIFIED,
        include_deleted: bool = False, page_size: int = LIST_PAGE_SIZE, page_token: str = "", timeout_s: float | None = None,
    ) -> ingest_pb2.ListDocumentsResponse:
        """One page of the tenant's documents in id order; `page.next_page_token` names the next
        (empty: the last). `stage` unspecified: every stage but deleted (unless `include_deleted`)."""
        request = ingest_pb2.ListDocumentsRequest(
            tenant=tenant, stage=stage, include_deleted=include_deleted,
            page=common_pb2.PageRequest(page_size=page_size, page_token=page_token),
        )
        return await self._unary(self._stub.ListDocuments, request, timeout_s)

    async def documents(
        self, *, tenant: str = "", stage: common_pb2.DocumentStage.ValueType = common_pb2.DOCUMENT_STAGE_UNSPECIFIED,
        include_deleted: bool = False, page_size: int = LIST_PAGE_SIZE, timeout_s: float | None = None,
    ) -> AsyncIterator[ingest_pb2.DocumentStatus]:
        """Every document of the tenant, as `documents_page` selects them, page by page (each
        page with the whole timeout)."""
        token = ""
        while True:
            page = await self.documents_page(
                tenant=tenant, stage=stage, include_deleted=include_deleted, page_size=page_size, page_token=token, timeout_s=timeout_s
            )
            for document in page.documents:
                yield document
            token = page.page.next_page_token
            if not token:
                return

    async def wait_until_settled(
        self, document_ids: Iterable[str], *, within_s: float, tenant: str = "", poll_s: float = 0.5,
        timeout_s: float | None = None,
    ) -> dict[str, ingest_pb2.DocumentStatus]:
        """Poll each document's status until it is indexed, failed or deleted, or `within_s` has
        passed; the last status of each (a document still on its way keeps an earlier stage).
        `timeout_s` bounds each status call."""
        latest = {document_id: ingest_pb2.DocumentStatus(document_id=document_id) for document_id in document_ids}
        until = time.monotonic() + within_s
        while True:
            for document_id, status in latest.items():
                if status.stage not in SETTLED:
                    latest[document_id] = await self.status(document_id, tenant=tenant, timeout_s=timeout_s)
            if all(status.stage in SETTLED for status in latest.values()) or time.monotonic() >= until:
                return latest
            await asyncio.sleep(poll_s)
