"""Bus handlers of the audit service: store every event published on `llmos.audit.>`."""

from __future__ import annotations

from llmos.bus.broker import Subscription
from llmos.bus.subjects import AUDIT_ALL
from llmos.v1 import events_pb2
from services.audit.core import AuditStore


def subscriptions(store: AuditStore) -> list[Subscription[events_pb2.AuditEvent]]:
    async def on_audit_event(event: events_pb2.AuditEvent) -> None:
        store.append(event)

    return [Subscription(AUDIT_ALL, events_pb2.AuditEvent, on_audit_event, batch_size=64)]
