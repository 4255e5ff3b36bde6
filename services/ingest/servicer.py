"""gRPC adapter of the ingest core."""

from __future__ import annotations

import grpc

from llmos.auth import current_principal, effective_tenant
from llmos.v1 import common_pb2, events_pb2, ingest_pb2, ingest_pb2_grpc
from services.ingest.core import IngestCore, now


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, core: IngestCore) -> None:
        self._core = core

    async def SubmitDocument(
        self, request: ingest_pb2.SubmitDocumentRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.SubmitDocumentResponse:
        document = events_pb2.DocumentSubmitted(
            document_id=request.document_id,
            tenant=effective_tenant(request.tenant),
            title=request.title,
            mime_type=request.mime_type,
            content=request.content,
            source=request.source,
            tags=request.tags,
            priority=request.priority,
            submitted_at=now(),
            metadata=request.metadata,
        )
        result = await self._core.submit(current_principal(), document)
        return ingest_pb2.SubmitDocumentResponse(
            document_id=result.document_id, content_hash=result.content_hash, stage=result.stage, unchanged=result.unchanged
        )

    async def GetDocumentStatus(
        self, request: ingest_pb2.GetDocumentStatusRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.DocumentStatus:
        return await self._core.status(effective_tenant(request.tenant), request.document_id)

    async def DeleteDocument(
        self, request: ingest_pb2.DeleteDocumentRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.DeleteDocumentResponse:
        deleted = await self._core.delete(current_principal(), effective_tenant(request.tenant), request.document_id)
        return ingest_pb2.DeleteDocumentResponse(document_id=request.document_id, deleted=deleted)

    async def ListDocuments(
        self, request: ingest_pb2.ListDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.ListDocumentsResponse:
        documents, next_token = await self._core.list(
            effective_tenant(request.tenant), request.page.page_size, request.page.page_token, request.stage, request.include_deleted
        )
        return ingest_pb2.ListDocumentsResponse(documents=documents, page=common_pb2.PageResponse(next_page_token=next_token))
