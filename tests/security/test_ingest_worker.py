"""Extraction and redaction run in worker processes that are killed past a time limit."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from llmos.auth import Principal
from llmos.bus.subjects import CHUNKS_CREATED, DOCS_FAILED
from llmos.errors import InvalidArgument
from llmos.testing import MemoryPublisher
from llmos.v1 import events_pb2
from services.ingest.core import IngestCore
from services.ingest.extract import ExtractionLimits, extract_text
from services.ingest.worker import ExtractionWorkers
from tests.unit.test_ingest_core import ingest_core

pytestmark = pytest.mark.security

TIMEOUT_S = 2.0
MARGIN_S = 1.5
OPERATOR = Principal("olga", "acme", frozenset({"operator"}))


def slow_extract(mime_type: str, content: bytes, limits: ExtractionLimits) -> str:
    """A parser stuck on a hostile document: content starting with `spin` never finishes (CPU-bound)."""
    if content.startswith(b"spin"):
        while True:
            pass
    return extract_text(mime_type, content, limits)


@pytest.fixture
async def workers() -> AsyncIterator[ExtractionWorkers]:
    pool = ExtractionWorkers(1, TIMEOUT_S)
    pool.start()
    yield pool
    await pool.close()


def core(workers: ExtractionWorkers, publisher: MemoryPublisher) -> IngestCore:
    return ingest_core(publisher, "*=email", workers=workers, extract=slow_extract)


def document(document_id: str, content: bytes) -> events_pb2.DocumentSubmitted:
    return events_pb2.DocumentSubmitted(tenant="acme", document_id=document_id, content=content)


async def test_a_document_past_the_extraction_limit_is_refused_and_the_next_is_processed(
    workers: ExtractionWorkers,
) -> None:
    publisher = MemoryPublisher()
    ingest = core(workers, publisher)
    # Warm: the worker has imported the extraction code (and this module) before the clock runs.
    await ingest.submit(OPERATOR, document("warm", b"Write to ann@example.com for a refund."))

    started = time.monotonic()
    with pytest.raises(InvalidArgument, match=f"extraction took longer than {TIMEOUT_S:g} s") as error:
        await ingest.submit(OPERATOR, document("hostile", b"spin " * 1000))
    elapsed = time.monotonic() - started
    assert error.value.field == "content"
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + MARGIN_S, elapsed
    failed = [message for subject, message in publisher.published if subject == DOCS_FAILED]
    assert [(message.document_id, message.reason) for message in failed] == [
        ("hostile", f"content: extraction took longer than {TIMEOUT_S:g} s")
    ]

    # The stuck worker was killed and replaced: the next document is served by the fresh one.
    result = await ingest.submit(OPERATOR, document("next", b"Refunds reach your card within five days. Ask bob@example.com."))
    assert not result.unchanged
    created = [message for subject, message in publisher.published if subject == CHUNKS_CREATED]
    assert created[-1].document_id == "next"
    assert created[-1].chunks[0].text == "Refunds reach your card within five days. Ask [EMAIL]."


async def test_errors_in_the_worker_keep_their_field_and_message(workers: ExtractionWorkers) -> None:
    ingest = core(workers, MemoryPublisher())
    with pytest.raises(InvalidArgument, match="not valid UTF-8") as error:
        await ingest.submit(OPERATOR, document("bad", b"\xff\xfe"))
    assert error.value.field == "content"
    with pytest.raises(InvalidArgument, match="no text once whitespace is removed"):
        await ingest.submit(OPERATOR, document("blank", b"   \n "))
    result = await ingest.submit(OPERATOR, document("ok", b"Returns are free."))
    assert not result.unchanged


async def test_a_warm_worker_adds_little_per_document(workers: ExtractionWorkers) -> None:
    """The round trip to a warm worker (pickling the content both ways) stays in milliseconds."""
    content = b"Returns are free within 30 days of delivery. " * 2000  # 90 kB
    ingest = core(workers, MemoryPublisher())
    await ingest.submit(OPERATOR, document("warm", b"warm up"))
    rounds = 20
    started = time.perf_counter()
    for _ in range(rounds):
        await workers.run(len, content)
    per_call = (time.perf_counter() - started) / rounds
    assert per_call < 0.05, per_call
