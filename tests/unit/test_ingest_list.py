"""ListDocuments in the ingest core: a tenant's documents in id order, page by page, by stage."""

from __future__ import annotations

import pytest

from llmos.audit import AuditLog
from llmos.errors import InvalidArgument
from llmos.pii import PiiPolicy
from llmos.testing import MemoryBucket, MemoryPublisher
from llmos.v1 import common_pb2, events_pb2
from services.ingest.core import DocumentStatusStore, IngestCore
from services.ingest.settings import IngestSettings
from tests.unit.test_ingest_core import OPERATOR, word_offsets

pytestmark = pytest.mark.unit

UNSPECIFIED = common_pb2.DOCUMENT_STAGE_UNSPECIFIED


def listing_core() -> IngestCore:
    bucket = MemoryBucket()

    async def keys(prefix: str) -> list[str]:
        return [key for key in bucket.entries if key.startswith(prefix)]

    return IngestCore(
        MemoryPublisher(),
        DocumentStatusStore(bucket, keys),
        AuditLog(MemoryPublisher(), "ingest"),
        word_offsets,
        chunk_tokens=64,
        overlap_tokens=8,
        limits=IngestSettings().document_limits(),
        pii=PiiPolicy.parse("*=none"),
    )


async def submit(core: IngestCore, tenant: str, document_id: str, content: bytes = b"Returns are free.") -> None:
    await core.submit(OPERATOR, events_pb2.DocumentSubmitted(tenant=tenant, document_id=document_id, content=content))


async def test_documents_come_in_id_order_page_by_page_and_only_the_tenants_own() -> None:
    core = listing_core()
    for document_id in ("faq", "returns", "Ünïcode/ids ok", "a", "shipping"):
        await submit(core, "acme", document_id)
    await submit(core, "globex", "secret")

    seen: list[str] = []
    token = ""
    while True:
        page, token = await core.list("acme", 2, token, UNSPECIFIED, include_deleted=False)
        assert len(page) <= 2
        seen += [status.document_id for status in page]
        if not token:
            break
    assert seen == sorted(["faq", "returns", "Ünïcode/ids ok", "a", "shipping"])
    assert all(status.stage == common_pb2.DOCUMENT_STAGE_CHUNKED for status in (await core.list("acme", 0, "", UNSPECIFIED, False))[0])
    assert [status.document_id for status in (await core.list("globex", 0, "", UNSPECIFIED, False))[0]] == ["secret"]


async def test_deleted_and_failed_documents_are_filtered_by_stage() -> None:
    core = listing_core()
    await submit(core, "acme", "kept")
    await submit(core, "acme", "gone")
    await core.delete(OPERATOR, "acme", "gone")
    with pytest.raises(InvalidArgument):
        await submit(core, "acme", "empty", content=b"")

    def ids(page: list) -> list[str]:  # type: ignore[type-arg]
        return [status.document_id for status in page]

    assert ids((await core.list("acme", 0, "", UNSPECIFIED, False))[0]) == ["empty", "kept"]
    assert ids((await core.list("acme", 0, "", UNSPECIFIED, True))[0]) == ["empty", "gone", "kept"]
    assert ids((await core.list("acme", 0, "", common_pb2.DOCUMENT_STAGE_DELETED, False))[0]) == ["gone"]
    failed = (await core.list("acme", 0, "", common_pb2.DOCUMENT_STAGE_FAILED, False))[0]
    assert ids(failed) == ["empty"] and "empty" in failed[0].reason


async def test_a_page_size_out_of_range_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="page_size"):
        await listing_core().list("acme", 10_000, "", UNSPECIFIED, False)
