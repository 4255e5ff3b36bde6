"""A bad payload goes to the dead-letter subject and the consumer goes on."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from llmos.bus.subjects import INGEST_REQUESTED, dead_letter_subject
from llmos.v1 import audit_pb2, audit_pb2_grpc, events_pb2, ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningStack
from tests.grpc_helpers import ADMIN
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
    async with grpc.aio.insecure_channel(stack.addr("audit")) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        for _ in range(100):
            records = [r async for r in stub.Query(audit_pb2.QueryAuditRequest(action="after/garbage"), metadata=ADMIN)]
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
    async with grpc.aio.insecure_channel(stack.addr("ingest")) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        for _ in range(100):
            try:
                status = await stub.GetDocumentStatus(ingest_pb2.GetDocumentStatusRequest(document_id="after-bad"), metadata=ADMIN)
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                await asyncio.sleep(0.1)
    assert status.chunk_count == 1

    async with grpc.aio.insecure_channel(stack.addr("audit")) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        for _ in range(100):
            drops = [r async for r in audit.Query(audit_pb2.QueryAuditRequest(action="bus/dead-letter"), metadata=ADMIN)]
            ours = [r.event for r in drops if r.event.resource == f"subject/{INGEST_REQUESTED}" and "image/png" in r.event.reason]
            if ours:
                break
            await asyncio.sleep(0.1)
    drop = ours[0]
    assert drop.service == "ingest" and drop.tenant == "acme" and "mime_type" in drop.reason
    assert drop.decision == events_pb2.AUDIT_DECISION_DENY
