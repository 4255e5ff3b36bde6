"""Ingestion logic, shared by the gRPC API and the `llmos.ingest.requested` consumer.

A document is validated, decoded, normalized and hashed; unchanged content is not processed
twice; the text is cut into token-sized chunks whose ids derive from the document id and
position, so re-submitting a document replaces its chunks; the chunks go out on
`llmos.chunks.created`. Each document's stage is kept in the `document_status` KV bucket.
Failures are reported on `llmos.docs.failed` as well as to the caller.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from nats.js.errors import KeyNotFoundError

from llmos.audit import AuditLog
from llmos.auth import Principal
from llmos.bus.broker import Bus
from llmos.bus.subjects import CHUNKS_CREATED, DOCS_DELETED, DOCS_FAILED
from llmos.errors import InvalidArgument, LlmosError, NotFound
from llmos.v1 import common_pb2, events_pb2, ingest_pb2
from services.ingest.chunking import chunk_spans, normalize

# Types this slice accepts; HTML boilerplate stripping and PDF text extraction come with the
# knowledge-base work (issue 4).
SUPPORTED_MIME_TYPES = ("text/plain", "text/markdown")
MAX_ID_CHARS = 256

TokenOffsets = Callable[[str], Awaitable[Sequence[tuple[int, int]]]]


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def chunk_id(tenant: str, document_id: str, index: int) -> str:
    """Stable across re-submissions, so the new chunks overwrite the old ones."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"llmos:{tenant}/{document_id}#{index}"))


STATUS_BUCKET = "document_status"


class DocumentStatusStore:
    """Each document's stage, in a KV bucket so it survives restarts and is shared by replicas."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    @staticmethod
    def _key(tenant: str, document_id: str) -> str:
        # KV keys allow a restricted alphabet; ids are free text.
        return hashlib.sha256(f"{tenant}\x00{document_id}".encode()).hexdigest()

    async def get(self, tenant: str, document_id: str) -> ingest_pb2.DocumentStatus | None:
        try:
            entry = await (await self._bus.key_value(STATUS_BUCKET)).get(self._key(tenant, document_id))
        except KeyNotFoundError:
            return None
        return ingest_pb2.DocumentStatus.FromString(entry.value or b"")

    async def put(self, status: ingest_pb2.DocumentStatus) -> None:
        status.updated_at.CopyFrom(now())
        bucket = await self._bus.key_value(STATUS_BUCKET)
        await bucket.put(self._key(status.tenant, status.document_id), status.SerializeToString())


@dataclass(frozen=True)
class SubmitResult:
    document_id: str
    content_hash: str
    stage: common_pb2.DocumentStage.ValueType
    unchanged: bool


class IngestCore:
    def __init__(
        self,
        bus: Bus,
        statuses: DocumentStatusStore,
        audit: AuditLog,
        token_offsets: TokenOffsets,
        chunk_tokens: int,
        overlap_tokens: int,
        max_document_bytes: int,
    ) -> None:
        self._bus = bus
        self._statuses = statuses
        self._audit = audit
        self._token_offsets = token_offsets
        self._chunk_tokens = chunk_tokens
        self._overlap_tokens = overlap_tokens
        self._max_document_bytes = max_document_bytes

    def _validate(self, document: events_pb2.DocumentSubmitted) -> str:
        if not document.tenant:
            raise InvalidArgument("tenant", "every document belongs to a tenant")
        if len(document.document_id) > MAX_ID_CHARS:
            raise InvalidArgument("document_id", f"longer than {MAX_ID_CHARS} characters")
        if not document.content:
            raise InvalidArgument("content", "the document is empty")
        if len(document.content) > self._max_document_bytes:
            raise InvalidArgument(
                "content", f"{len(document.content)} bytes is over the limit of {self._max_document_bytes}"
            )
        mime_type = document.mime_type or "text/plain"
        if mime_type not in SUPPORTED_MIME_TYPES:
            raise InvalidArgument(
                "mime_type", f"{mime_type!r} is not supported; accepted: {', '.join(SUPPORTED_MIME_TYPES)}"
            )
        try:
            raw = document.content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument("content", f"not valid UTF-8 (byte {exc.start})") from None
        text = normalize(raw)
        if not text:
            raise InvalidArgument("content", "the document has no text once whitespace is removed")
        return text

    async def submit(self, principal: Principal, document: events_pb2.DocumentSubmitted) -> SubmitResult:
        if not document.document_id:
            document.document_id = uuid.uuid4().hex
        try:
            text = self._validate(document)
            content_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
            previous = await self._statuses.get(document.tenant, document.document_id)
            if previous is not None and previous.content_hash == content_hash and previous.stage not in (
                common_pb2.DOCUMENT_STAGE_FAILED,
                common_pb2.DOCUMENT_STAGE_DELETED,
            ):
                return SubmitResult(document.document_id, content_hash, previous.stage, unchanged=True)
            chunks = await self._chunks(document, text)
        except LlmosError as exc:
            await self._fail(document, exc.message)
            raise
        await self._bus.publish(
            CHUNKS_CREATED,
            events_pb2.ChunksCreated(
                document_id=document.document_id,
                tenant=document.tenant,
                content_hash=content_hash,
                chunks=chunks,
                priority=document.priority,
                submitted_at=document.submitted_at if document.HasField("submitted_at") else now(),
            ),
            msg_id=f"{document.tenant}/{document.document_id}/{content_hash}",
        )
        await self._statuses.put(
            ingest_pb2.DocumentStatus(
                document_id=document.document_id,
                tenant=document.tenant,
                stage=common_pb2.DOCUMENT_STAGE_CHUNKED,
                chunk_count=len(chunks),
                content_hash=content_hash,
            )
        )
        await self._audit.record(principal, document.tenant, "ingest/submit", f"document/{document.document_id}")
        return SubmitResult(document.document_id, content_hash, common_pb2.DOCUMENT_STAGE_CHUNKED, unchanged=False)

    async def _chunks(self, document: events_pb2.DocumentSubmitted, text: str) -> list[common_pb2.Chunk]:
        offsets = await self._token_offsets(text)
        spans = chunk_spans(text, offsets, self._chunk_tokens, self._overlap_tokens)
        return [
            common_pb2.Chunk(
                chunk_id=chunk_id(document.tenant, document.document_id, index),
                document_id=document.document_id,
                tenant=document.tenant,
                index=index,
                text=text[span.start:span.end],
                start_offset=span.start,
                end_offset=span.end,
                token_count=span.token_count,
                title=document.title,
                source=document.source,
                tags=list(document.tags),
            )
            for index, span in enumerate(spans)
        ]

    async def _fail(self, document: events_pb2.DocumentSubmitted, reason: str) -> None:
        failure = events_pb2.DocumentFailed(
            document_id=document.document_id,
            tenant=document.tenant,
            stage=common_pb2.DOCUMENT_STAGE_RECEIVED,
            reason=reason,
            failed_at=now(),
        )
        await self._bus.publish(DOCS_FAILED, failure)
        if document.tenant:
            await self._statuses.put(
                ingest_pb2.DocumentStatus(
                    document_id=document.document_id,
                    tenant=document.tenant,
                    stage=common_pb2.DOCUMENT_STAGE_FAILED,
                    reason=reason,
                )
            )

    async def status(self, tenant: str, document_id: str) -> ingest_pb2.DocumentStatus:
        if not document_id:
            raise InvalidArgument("document_id", "is required")
        status = await self._statuses.get(tenant, document_id)
        if status is None:
            raise NotFound(f"no document {document_id!r} in tenant {tenant!r}")
        return status

    async def delete(self, principal: Principal, tenant: str, document_id: str) -> bool:
        status = await self.status(tenant, document_id)
        if status.stage == common_pb2.DOCUMENT_STAGE_DELETED:
            return False
        await self._bus.publish(
            DOCS_DELETED,
            events_pb2.DocumentDeleted(document_id=document_id, tenant=tenant, deleted_at=now()),
            msg_id=f"{tenant}/{document_id}/deleted/{status.content_hash}",
        )
        status.stage = common_pb2.DOCUMENT_STAGE_DELETED
        status.reason = ""
        await self._statuses.put(status)
        await self._audit.record(principal, tenant, "ingest/delete", f"document/{document_id}")
        return True
