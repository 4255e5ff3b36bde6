"""gRPC adapter of the audit store: Query (tenant-confined, paged) and Verify (against the latest
checkpoint, and one the caller kept)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from llmos.auth import effective_tenant
from llmos.errors import InvalidArgument
from llmos.v1 import audit_pb2, audit_pb2_grpc
from services.audit.core import AuditQuery, AuditStore

DEFAULT_PAGE_SIZE = 100


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, store: AuditStore, max_page_size: int) -> None:
        self._store = store
        self._max_page_size = max_page_size

    async def Query(
        self, request: audit_pb2.QueryAuditRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[audit_pb2.AuditRecord]:
        page_size = request.page.page_size or DEFAULT_PAGE_SIZE
        if not 0 < page_size <= self._max_page_size:
            raise InvalidArgument("page.page_size", f"must be between 1 and {self._max_page_size}")
        token = request.page.page_token
        if token and not token.isdigit():
            raise InvalidArgument("page.page_token", "not a token returned by a previous Query")
        query = AuditQuery(
            tenant=effective_tenant(request.tenant),
            principal=request.principal,
            action=request.action,
            start_ns=request.start_time.ToNanoseconds() if request.HasField("start_time") else 0,
            end_ns=request.end_time.ToNanoseconds() if request.HasField("end_time") else 0,
            after_sequence=int(token or 0),
            limit=page_size,
        )
        for record in self._store.query(query):
            yield audit_pb2.AuditRecord(
                sequence=record.sequence, event=record.event, previous_hash=record.previous_hash, hash=record.hash,
                key_id=record.key_id,
            )

    async def Verify(
        self, request: audit_pb2.VerifyAuditRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.VerifyAuditResponse:
        result = self._store.verify(request.checkpoint if request.HasField("checkpoint") else None)
        return audit_pb2.VerifyAuditResponse(
            intact=result.intact,
            records_checked=result.records_checked,
            first_broken_sequence=result.first_broken_sequence,
            reason=result.reason,
            checkpoint=result.checkpoint,
        )
