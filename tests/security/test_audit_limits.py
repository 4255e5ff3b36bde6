"""On a real nats-server: the AUDIT stream refuses oversized records and holds any bounded one."""

from __future__ import annotations

import nats
import pytest
from nats.js.errors import APIError

from llmos.audit import DENY, audit_event
from llmos.bus.broker import declare_streams
from llmos.bus.subjects import STREAMS, audit_subject
from tests.conftest import NatsServer

pytestmark = pytest.mark.security

HUGE = 1_000_000


async def test_the_audit_stream_takes_bounded_records_and_refuses_larger_messages(nats_server: NatsServer) -> None:
    (audit,) = [spec for spec in STREAMS if spec.name == "AUDIT"]
    connection = await nats.connect(nats_server.url)
    try:
        js = connection.jetstream()
        await declare_streams(js, update=True)
        config = (await js.stream_info("AUDIT")).config
        assert (config.max_msg_size, config.max_bytes) == (audit.max_msg_size, audit.max_bytes)
        largest = audit_event("ingest", "anonymous", "", "x" * HUGE, "document/" + "\U0001f600" * HUGE, DENY, "y" * HUGE)
        await js.publish(audit_subject("ingest"), largest.SerializeToString())
        with pytest.raises(APIError, match="(?i)message size exceeds"):
            await js.publish(audit_subject("ingest"), b"x" * (audit.max_msg_size + 1))
    finally:
        await connection.close()
