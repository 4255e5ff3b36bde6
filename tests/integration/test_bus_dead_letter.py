"""A bad payload goes to the dead-letter subject and the consumer goes on."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from llmos.bus.subjects import INGEST_REQUESTED, dead_letter_subject
from llmos.clients import AuditClient, IngestClient
from llmos.errors import NotFound
from llmos.v1 import events_pb2
from tests.conftest import RunningStack
from tests.grpc_helpers import connected
from tests.integration.bus_helpers import last_message, last_sequence, publish

pytestmark = pytest.mark.integration


async def test_garbage_on_a_consumed_subject_is_dead_lettered_and_consumption_continues(stack: RunningStack) -> None:
    url = stack.settings.nats_url
    dlq = dead_letter_subject("llmos.audit.fuzz")
    before = await last_sequence(url, dlq)
    await publish(url, "llmos.audit.fuzz", b"\xff\x00 not protobuf \xfe")
    letter = events_pb2.DeadLetter.FromString((await last_message(url, dlq, after_seq=before)).data)
    assert letter.subject == "llmos.audit.fuzz"
    assert letter.service == "audit"
    assert letter.payload == b"\xff\x00 not protobuf \xfe"
    assert "not a valid llmos.v1.AuditEvent" in letter.error

    event = events_pb2.AuditEvent(
        event_id=uuid.uuid4().hex, time=Timestamp(seconds=1_700_000_000), principal="tester",
        tenant="acme", service="fuzz", action="after/garbage", resource="r",
    )
    await publish(url, "llmos.audit.fuzz", event.SerializeToString())
    async with connected(stack, AuditClient) as audit:
        for _ in range(100):
            records = [r async for r in audit.query(action="after/garbage")]
            if records:
                break
            await asyncio.sleep(0.1)
    assert [record.event.event_id for record in records] == [event.event_id]


async def test_an_invalid_document_on_the_bus_is_dead_lettered_with_a_failure_event(stack: RunningStack) -> None:
    url = stack.settings.nats_url
    dlq = dead_letter_subject(INGEST_REQUESTED)
    before_dlq = await last_sequence(url, dlq)
    before_failed = await last_sequence(url, "llmos.docs.failed")
    document = events_pb2.DocumentSubmitted(document_id="bad-mime", tenant="acme", mime_type="image/png", content=b"\x89PNG")
    await publish(url, INGEST_REQUESTED, document.SerializeToString())
    letter = events_pb2.DeadLetter.FromString((await last_message(url, dlq, after_seq=before_dlq)).data)
    assert "mime_type" in letter.error and "not supported" in letter.error
    failed = events_pb2.DocumentFailed.FromString((await last_message(url, "llmos.docs.failed", after_seq=before_failed)).data)
    assert failed.document_id == "bad-mime" and "image/png" in failed.reason

    good = events_pb2.DocumentSubmitted(document_id="after-bad", tenant="acme", content=b"The consumer goes on.")
    await publish(url, INGEST_REQUESTED, good.SerializeToString())
    async with connected(stack, IngestClient) as ingest:
        for _ in range(100):
            try:
                status = await ingest.status("after-bad")
                break
            except NotFound:
                await asyncio.sleep(0.1)
    assert status.chunk_count == 1

    async with connected(stack, AuditClient) as audit:
        for _ in range(100):
            drops = [r async for r in audit.query(action="bus/dead-letter")]
            ours = [r.event for r in drops if r.event.resource == f"subject/{INGEST_REQUESTED}" and "image/png" in r.event.reason]
            if ours:
                break
            await asyncio.sleep(0.1)
    drop = ours[0]
    assert drop.service == "ingest" and drop.tenant == "acme" and "mime_type" in drop.reason
    assert drop.decision == events_pb2.AUDIT_DECISION_DENY
