"""Ingestion logic, shared by the gRPC API and the `llmos.ingest.requested` consumer.

A document is validated, its text extracted (HTML without boilerplate, PDF text layer),
normalized, redacted of personal data by its tenant's policy and hashed; unchanged content is
not processed twice; the text is cut into token-sized chunks whose ids derive from the document id and
position, so re-submitting a document replaces its chunks; the chunks go out on
`llmos.chunks.created`. Each document's stage is kept in the `document_status` KV bucket.
Failures are reported on `llmos.docs.failed` as well as to the caller. Later stages report
back on the bus (`llmos.chunks.embedded`, `llmos.docs.indexed`) and `advance` moves the status
forward, for the content it was about only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import metrics

from llmos.audit import AuditLog
from llmos.auth import Principal, acting_as
from llmos.bus.subjects import CHUNKS_CREATED, DOCS_DELETED, DOCS_FAILED
from llmos.errors import InvalidArgument, LlmosError, NotFound, Unimplemented
from llmos.pii import PiiPolicy
from llmos.ports import Bucket, Publisher, VersionedStore
from llmos.telemetry import seconds_histogram
from llmos.v1 import common_pb2, events_pb2, ingest_pb2
from services.ingest.chunking import chunk_spans
from services.ingest.extract import SUPPORTED_MIME_TYPES, ExtractionLimits, extract_text
from services.ingest.worker import ExtractionWorkers, Extractor, Prepared, in_thread, prepare

MAX_ID_CHARS = 256
# Documents in one page of ListDocuments.
DEFAULT_LIST_PAGE_SIZE = 50
MAX_LIST_PAGE_SIZE = 500
# Stages a document moves through in order; a report never moves a status backwards.
_PIPELINE_ORDER = (
    common_pb2.DOCUMENT_STAGE_RECEIVED,
    common_pb2.DOCUMENT_STAGE_CHUNKED,
    common_pb2.DOCUMENT_STAGE_EMBEDDED,
    common_pb2.DOCUMENT_STAGE_INDEXED,
)

TokenOffsets = Callable[[str], Awaitable[Sequence[tuple[int, int]]]]

# The metric and attribute of the time a submission spends in each of its stages: extract and
# redact (in the worker process), extract.wait (waiting for a free worker and the pipe), tokenize
# (the tokenizer RPC), chunk, status (KV reads and writes), publish (chunks.created) and audit.
STAGE_DURATION = "llmos.ingest.stage.duration"
STAGE_ATTRIBUTE = "llmos.ingest.stage"


@dataclass(frozen=True)
class DocumentLimits:
    """Sizes a submission may have: its metadata travels with every chunk (copied into each
    chunk's payload and index entry), so an unbounded title or tag list multiplies."""

    max_document_bytes: int
    max_title_chars: int
    max_source_chars: int
    max_tags: int
    max_tag_chars: int
    extraction: ExtractionLimits


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def chunk_id(tenant: str, document_id: str, index: int) -> str:
    """Stable across re-submissions, so the new chunks overwrite the old ones.

    Each part is prefixed with its length, so no tenant or document id can end where another
    begins, whatever separators they hold (tenant `acme` with document `eu/faq` is not tenant
    `acme/eu` with document `faq`).
    """
    name = "".join(f"{len(part)}:{part}" for part in (tenant, document_id, str(index)))
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"llmos:chunk:{name}"))


STATUS_BUCKET = "document_status"


# Lists the keys of the status bucket starting with a prefix (`KvKeyLister` on JetStream).
KeyLister = Callable[[str], Awaitable[Sequence[str]]]
_INDEX_PREFIX = "index."


def index_prefix(tenant: str) -> str:
    """Keys of a tenant's document index entries start with this (the tenant hashed: keys allow a
    restricted alphabet)."""
    return f"{_INDEX_PREFIX}{hashlib.sha256(tenant.encode()).hexdigest()}."


def index_key(tenant: str, document_id: str) -> str:
    """The document id hex-encoded, so keys sort in document id order (UTF-8 byte order)."""
    return index_prefix(tenant) + document_id.encode().hex()


class DocumentStatusStore:
    """Each document's stage, in a KV bucket so it survives restarts and is shared by replicas.

    Reports from later stages arrive concurrently (embedded, indexed): `change` applies an
    update as a compare-and-set on the entry's revision, retrying when another writer won.
    Status keys are hashes of tenant and document id, so listing a tenant's documents reads an
    index beside them: one empty entry per document, keyed by tenant and document id, written
    before the status itself (an index entry without a status is skipped).
    """

    def __init__(self, bucket: Bucket, list_keys: KeyLister | None = None) -> None:
        self._bucket = bucket
        self._list_keys = list_keys
        self._records = VersionedStore(
            bucket,
            ingest_pb2.DocumentStatus.SerializeToString,
            ingest_pb2.DocumentStatus.FromString,
            "status of document",
            stamp=lambda status: status.updated_at.CopyFrom(now()),
        )

    async def get(self, tenant: str, document_id: str) -> ingest_pb2.DocumentStatus | None:
        stored = await self._records.get(tenant, document_id)
        return stored.value if stored else None

    async def put(self, status: ingest_pb2.DocumentStatus) -> None:
        await self._bucket.put(index_key(status.tenant, status.document_id), b"")
        await self._records.put(status.tenant, status.document_id, status)

    async def document_ids(self, tenant: str) -> list[str]:
        """Every document id the tenant has a status for, sorted."""
        if self._list_keys is None:
            raise Unimplemented("listing documents needs a key lister for the status bucket")
        prefix = index_prefix(tenant)
        keys = await self._list_keys(prefix)
        return sorted(bytes.fromhex(key[len(prefix):]).decode() for key in keys if key.startswith(prefix))

    async def change(self, tenant: str, document_id: str, update: Callable[[ingest_pb2.DocumentStatus], bool]) -> bool:
        """Apply `update` (which returns False to leave the entry alone) atomically."""
        return await self._records.change(tenant, document_id, update)


@dataclass(frozen=True)
class SubmitResult:
    document_id: str
    content_hash: str
    stage: common_pb2.DocumentStage.ValueType
    unchanged: bool


class IngestCore:
    def __init__(
        self,
        publisher: Publisher,
        statuses: DocumentStatusStore,
        audit: AuditLog,
        token_offsets: TokenOffsets,
        chunk_tokens: int,
        overlap_tokens: int,
        limits: DocumentLimits,
        pii: PiiPolicy,
        workers: ExtractionWorkers | None = None,
        extract: Extractor = extract_text,
    ) -> None:
        """`workers` run extraction and redaction with a time limit (the service always gives
        them; without, as in some unit tests, they run in a thread with none); `extract` turns
        content into text, a module-level function so a worker process can import it."""
        self._publisher = publisher
        self._statuses = statuses
        self._audit = audit
        self._token_offsets = token_offsets
        self._chunk_tokens = chunk_tokens
        self._overlap_tokens = overlap_tokens
        self._limits = limits
        self._pii = pii
        self._run = workers.run if workers is not None else in_thread
        self._extract = extract
        self._stage_duration = seconds_histogram(
            metrics.get_meter("llmos.ingest"), STAGE_DURATION, "time one document spent in a stage of its submission"
        )

    def _record(self, stage: str, seconds: float) -> None:
        self._stage_duration.record(seconds, {STAGE_ATTRIBUTE: stage})

    @contextlib.contextmanager
    def _stage(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._record(stage, time.perf_counter() - started)

    def _validate(self, document: events_pb2.DocumentSubmitted) -> None:
        limits = self._limits
        if not document.tenant:
            raise InvalidArgument("tenant", "every document belongs to a tenant")
        for field, value, limit in (
            ("tenant", document.tenant, MAX_ID_CHARS),
            ("document_id", document.document_id, MAX_ID_CHARS),
            ("title", document.title, limits.max_title_chars),
            ("source", document.source, limits.max_source_chars),
        ):
            if len(value) > limit:
                raise InvalidArgument(field, f"{len(value)} characters is over the limit of {limit}")
        if len(document.tags) > limits.max_tags:
            raise InvalidArgument("tags", f"{len(document.tags)} tags is over the limit of {limits.max_tags}")
        for position, tag in enumerate(document.tags):
            if len(tag) > limits.max_tag_chars:
                raise InvalidArgument(f"tags[{position}]", f"{len(tag)} characters is over the limit of {limits.max_tag_chars}")
        if not document.content:
            raise InvalidArgument("content", "the document is empty")
        if len(document.content) > limits.max_document_bytes:
            raise InvalidArgument(
                "content", f"{len(document.content)} bytes is over the limit of {limits.max_document_bytes}"
            )
        mime_type = document.mime_type or "text/plain"
        if mime_type not in SUPPORTED_MIME_TYPES:
            raise InvalidArgument(
                "mime_type", f"{mime_type!r} is not supported; accepted: {', '.join(SUPPORTED_MIME_TYPES)}"
            )

    async def _text(self, document: events_pb2.DocumentSubmitted) -> tuple[str, int]:
        """Normalized, redacted text and the number of personal-data findings removed."""
        self._validate(document)
        # Parsing and redaction are CPU work on the sender's input: off the event loop, in a
        # worker process killed when it runs past the time limit (services.ingest.worker).
        started = time.perf_counter()
        prepared: Prepared = await self._run(
            prepare,
            self._extract,
            document.mime_type or "text/plain",
            document.content,
            self._limits.extraction,
            self._pii.redactor(document.tenant),
        )
        self._record("extract", prepared.extract_s)
        self._record("redact", prepared.redact_s)
        self._record("extract.wait", max(0.0, time.perf_counter() - started - prepared.extract_s - prepared.redact_s))
        return prepared.text, prepared.redacted

    async def submit(self, principal: Principal, document: events_pb2.DocumentSubmitted) -> SubmitResult:
        if not document.document_id:
            document.document_id = uuid.uuid4().hex
        try:
            text, redacted = await self._text(document)
            content_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
            with self._stage("status"):
                previous = await self._statuses.get(document.tenant, document.document_id)
            if previous is not None and previous.content_hash == content_hash and previous.stage not in (
                common_pb2.DOCUMENT_STAGE_RECEIVED,
                common_pb2.DOCUMENT_STAGE_FAILED,
                common_pb2.DOCUMENT_STAGE_DELETED,
            ):
                return SubmitResult(document.document_id, content_hash, previous.stage, unchanged=True)
            # The tokenizer is called for the submitting principal (a bus publisher: the document's tenant).
            with acting_as(principal):
                chunks = await self._chunks(document, text)
        except LlmosError as exc:
            await self._fail(document, exc.message)
            raise
        # RECEIVED with the new hash first: reports about this content that come back before
        # the CHUNKED update below then already find it (and a failed publish is redone).
        with self._stage("status"):
            await self._statuses.put(
                ingest_pb2.DocumentStatus(
                    document_id=document.document_id,
                    tenant=document.tenant,
                    stage=common_pb2.DOCUMENT_STAGE_RECEIVED,
                    chunk_count=len(chunks),
                    content_hash=content_hash,
                )
            )
        with self._stage("publish"):
            await self._publisher.publish(
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
        with self._stage("status"):
            await self.advance(document.tenant, document.document_id, content_hash, common_pb2.DOCUMENT_STAGE_CHUNKED, len(chunks))
        with self._stage("audit"):
            await self._audit.record(
                principal,
                document.tenant,
                "ingest/submit",
                f"document/{document.document_id}",
                reason=f"{redacted} personal data findings redacted" if redacted else "",
            )
        return SubmitResult(document.document_id, content_hash, common_pb2.DOCUMENT_STAGE_CHUNKED, unchanged=False)

    async def _chunks(self, document: events_pb2.DocumentSubmitted, text: str) -> list[common_pb2.Chunk]:
        with self._stage("tokenize"):
            offsets = await self._token_offsets(text)
        with self._stage("chunk"):
            return self._chunks_at(document, text, offsets)

    def _chunks_at(
        self, document: events_pb2.DocumentSubmitted, text: str, offsets: Sequence[tuple[int, int]]
    ) -> list[common_pb2.Chunk]:
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
        await self._publisher.publish(DOCS_FAILED, failure)
        # A status is kept only under a valid-sized id: the index key holds the id, and a subject
        # over the server's control-line limit (4 KiB) makes NATS close the service's connection.
        if document.tenant and len(document.tenant) <= MAX_ID_CHARS and len(document.document_id) <= MAX_ID_CHARS:
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

    async def list(
        self, tenant: str, page_size: int, page_token: str, stage: common_pb2.DocumentStage.ValueType, include_deleted: bool
    ) -> tuple[list[ingest_pb2.DocumentStatus], str]:
        """A page of the tenant's documents after `page_token` (a document id), in document id
        order, and the next page's token (empty: the last page)."""
        if page_size < 0 or page_size > MAX_LIST_PAGE_SIZE:
            raise InvalidArgument("page.page_size", f"{page_size} is out of range; give 1 to {MAX_LIST_PAGE_SIZE} (0: {DEFAULT_LIST_PAGE_SIZE})")
        if len(page_token) > MAX_ID_CHARS:
            raise InvalidArgument("page.page_token", "is not a token this service returned")
        size = page_size or DEFAULT_LIST_PAGE_SIZE

        def wanted(status: ingest_pb2.DocumentStatus | None) -> bool:
            if status is None:  # its index entry was written, its status not (yet)
                return False
            if stage != common_pb2.DOCUMENT_STAGE_UNSPECIFIED:
                return status.stage == stage
            return include_deleted or status.stage != common_pb2.DOCUMENT_STAGE_DELETED

        remaining = [document_id for document_id in await self._statuses.document_ids(tenant) if document_id > page_token]
        found: list[ingest_pb2.DocumentStatus] = []
        while remaining and len(found) < size:
            batch, remaining = remaining[: size - len(found)], remaining[size - len(found):]
            statuses = await asyncio.gather(*(self._statuses.get(tenant, document_id) for document_id in batch))
            found += [status for status in statuses if wanted(status)]
        return found, found[-1].document_id if found and remaining else ""

    async def delete(self, principal: Principal, tenant: str, document_id: str) -> bool:
        status = await self.status(tenant, document_id)
        if status.stage == common_pb2.DOCUMENT_STAGE_DELETED:
            return False
        await self._publisher.publish(
            DOCS_DELETED,
            events_pb2.DocumentDeleted(document_id=document_id, tenant=tenant, deleted_at=now()),
            msg_id=f"{tenant}/{document_id}/deleted/{status.content_hash}",
        )
        status.stage = common_pb2.DOCUMENT_STAGE_DELETED
        status.reason = ""
        await self._statuses.put(status)
        await self._audit.record(principal, tenant, "ingest/delete", f"document/{document_id}")
        return True

    async def advance(
        self, tenant: str, document_id: str, content_hash: str, stage: common_pb2.DocumentStage.ValueType, chunk_count: int
    ) -> bool:
        """Record that a later stage finished with this content; False when the report is stale.

        Reports about older content (the document was re-submitted or deleted since) or about a
        stage the document has already passed change nothing.
        """
        def forward(status: ingest_pb2.DocumentStatus) -> bool:
            if status.content_hash != content_hash or status.stage not in _PIPELINE_ORDER:
                return False
            if _PIPELINE_ORDER.index(stage) <= _PIPELINE_ORDER.index(status.stage):
                return False
            status.stage = stage
            status.chunk_count = chunk_count or status.chunk_count
            return True

        return await self._statuses.change(tenant, document_id, forward)
