"""A handler whose dependency is UNAVAILABLE (every replica of a service restarting) is run again
within the same delivery, the server told the message is still in progress, instead of spending
the message's deliveries: three pass in 2.5 s, and the rolling restart of issue 16 lost documents
that way. A real nats-server, a real durable consumer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos.bus.broker import Bus, Subscription
from llmos.bus.subjects import DOCS_INDEXED, dead_letter_subject
from llmos.errors import Unavailable
from llmos.v1 import events_pb2
from tests.conftest import NatsServer, running_nats_server
from tests.integration.bus_helpers import last_sequence, publish

pytestmark = pytest.mark.integration

OUTAGE_S = 4.0  # longer than the 2.5 s in which three deliveries used to pass


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of its own: on the session's, a new durable consumer would first read every
    docs.indexed event other tests published, and other services would handle this one too."""
    with running_nats_server(tmp_path / "jetstream") as server:
        yield server


async def test_an_outage_of_a_dependency_spends_no_deliveries(nats_server: NatsServer) -> None:
    service = f"outage{uuid.uuid4().hex[:8]}"
    bus = Bus(nats_server.url, service, max_deliveries=3)
    document_id = f"doc-{uuid.uuid4().hex}"
    attempts: list[float] = []
    handled: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    outage_ends = 0.0

    async def on_indexed(indexed: events_pb2.DocumentIndexed) -> None:
        if indexed.document_id != document_id:
            return
        attempts.append(time.monotonic())
        if attempts[-1] < outage_ends:
            raise Unavailable("tokenizer: every replica restarting")
        if not handled.done():
            handled.set_result(len(attempts))

    bus.subscribe(Subscription(DOCS_INDEXED, events_pb2.DocumentIndexed, on_indexed))
    await bus.start()
    dlq_before = await last_sequence(nats_server.url, dead_letter_subject(DOCS_INDEXED))
    try:
        outage_ends = time.monotonic() + OUTAGE_S
        event = events_pb2.DocumentIndexed(document_id=document_id, tenant="acme", chunk_count=1)
        await publish(nats_server.url, DOCS_INDEXED, event.SerializeToString())
        tries = await asyncio.wait_for(handled, timeout=OUTAGE_S + 20)
        consumer = await bus.jetstream.consumer_info("DOCS", bus.durable_name(DOCS_INDEXED))
    finally:
        await bus.close()
    assert tries > 3 and attempts[-1] >= outage_ends
    # One delivery carried every try; nothing was dead-lettered.
    assert consumer.num_redelivered == 0 and consumer.num_ack_pending == 0
    assert await last_sequence(nats_server.url, dead_letter_subject(DOCS_INDEXED)) == dlq_before
