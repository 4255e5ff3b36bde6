"""The audit service records the writer a record's subject names, not the one its payload claims
(issue 13, item 9): on a real nats-server with the authorization `llmos up` generates, ingest may
publish only on `llmos.audit.ingest`, so a record it sends claiming to come "from dialogue" is
stored as ingest's, the claim kept in its reason, marked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from llmos.audit import ALLOW, audit_event
from llmos.bus.broker import Bus
from llmos.bus.subjects import audit_subject
from llmos.crypto import new_key_entry
from llmos.v1 import events_pb2
from services.audit.chain import ChainKeys
from services.audit.core import AuditQuery, AuditStore
from services.audit.handlers import subscriptions
from tests.nats_helpers import SecuredNats, secured_nats_server

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
async def secured_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SecuredNats]:
    async with secured_nats_server(tmp_path_factory.mktemp("secured")) as server:
        yield server


async def stored(store: AuditStore, event_id: str, timeout_s: float = 10.0) -> events_pb2.AuditEvent:
    for _ in range(int(timeout_s / 0.05)):
        for record in store.query(AuditQuery(tenant="acme", limit=1000)):
            if record.event.event_id == event_id:
                return record.event
        await asyncio.sleep(0.05)
    raise AssertionError(f"record {event_id} was not stored within {timeout_s} s")


async def test_a_record_is_stored_under_the_service_its_subject_names(secured_nats: SecuredNats, tmp_path: Path) -> None:
    url, credentials = secured_nats.url, secured_nats.credentials
    store = AuditStore(tmp_path / "audit.sqlite3", ChainKeys.from_spec(new_key_entry()), tmp_path / "checkpoint.json")
    audit_bus = Bus(url, "audit", max_deliveries=3, user="audit", password=credentials["audit"])
    for subscription in subscriptions(store):
        audit_bus.subscribe(subscription)
    await audit_bus.start()
    ingest = Bus(url, "ingest", max_deliveries=3, user="ingest", password=credentials["ingest"])
    await ingest.start()
    try:
        forged = audit_event("dialogue", "alice", "acme", "dialogue/handoff", "session/s1", ALLOW, "handed to an agent")
        honest = audit_event("ingest", "alice", "acme", "ingest/submit", "document/d1", ALLOW)
        unnamed = audit_event("", "alice", "acme", "ingest/submit", "document/d2", ALLOW)
        for event in (forged, honest, unnamed):
            await ingest.publish(audit_subject("ingest"), event, msg_id=event.event_id)

        record = await stored(store, forged.event_id)
        assert record.service == "ingest"
        assert record.reason == "[payload named service 'dialogue'] handed to an agent"
        assert (await stored(store, honest.event_id)).reason == ""
        assert (await stored(store, honest.event_id)).service == "ingest"
        assert (await stored(store, unnamed.event_id)).service == "ingest"
        assert store.verify().intact
    finally:
        await ingest.close()
        await audit_bus.close()
        store.close()


async def test_a_service_cannot_publish_on_another_services_audit_subject(secured_nats: SecuredNats) -> None:
    """The other half of the guarantee: the subject names the writer because the server enforces it."""
    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error))

    ingest = await nats.connect(secured_nats.url, user="ingest", password=secured_nats.credentials["ingest"],
                                error_cb=on_error, allow_reconnect=False)
    try:
        await ingest.publish(audit_subject("dialogue"), audit_event("dialogue", "a", "acme", "x", "y", ALLOW).SerializeToString())
        await ingest.flush()
        await asyncio.sleep(0.2)
    finally:
        await ingest.close()
    assert errors and "permissions violation" in errors[0].lower()
