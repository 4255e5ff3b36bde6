"""Typed calls of the audit service: query the trail, verify its hash chain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from llmos.clients.base import ServiceClient
from llmos.v1 import audit_pb2, audit_pb2_grpc, common_pb2

QUERY_PAGE_SIZE = 100


class AuditClient(ServiceClient[audit_pb2_grpc.AuditServiceStub]):
    service = "audit"
    stub_type = audit_pb2_grpc.AuditServiceStub

    async def query(
        self, *, tenant: str = "", principal: str = "", action: str = "", since: datetime | None = None,
        until: datetime | None = None, after_sequence: int = 0, limit: int = 0, page_size: int = QUERY_PAGE_SIZE,
        timeout_s: float | None = None,
    ) -> AsyncIterator[audit_pb2.AuditRecord]:
        """The records matching every filter given, oldest first, from after `after_sequence`:
        all of them (page by page, each page with the whole timeout) or the first `limit`.
        `since` and `until` are aware datetimes (naive ones are read as UTC)."""
        wanted = limit or None
        sent = 0
        while True:
            size = min(page_size, wanted - sent) if wanted else page_size
            request = audit_pb2.QueryAuditRequest(
                tenant=tenant, principal=principal, action=action,
                start_time=_timestamp(since), end_time=_timestamp(until),
                page=common_pb2.PageRequest(page_size=size, page_token=str(after_sequence) if after_sequence else ""),
            )
            count = 0
            async for record in self._stream(self._stub.Query, request, timeout_s):
                yield record
                count += 1
                after_sequence = record.sequence
            sent += count
            if count < size or (wanted and sent >= wanted):
                return

    async def verify(
        self, *, checkpoint: audit_pb2.AuditCheckpoint | None = None, timeout_s: float | None = None
    ) -> audit_pb2.VerifyAuditResponse:
        """Walk the whole hash chain and check it against the service's latest checkpoint (and
        `checkpoint`, one kept from earlier): intact, or the first broken record and why."""
        return await self._unary(self._stub.Verify, audit_pb2.VerifyAuditRequest(checkpoint=checkpoint), timeout_s)


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    timestamp = Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp
