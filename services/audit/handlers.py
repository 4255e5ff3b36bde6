"""Bus handlers of the audit service: store every event published on `llmos.audit.>`."""

from __future__ import annotations

from llmos.bus.broker import Subscription
from llmos.bus.subjects import AUDIT_ALL, audit_subject
from llmos.v1 import events_pb2
from services.audit.core import AuditStore

_AUDIT_PREFIX = audit_subject("")


def writer_of(subject: str) -> str:
    """The service an audit subject belongs to: NATS lets only that service's user publish on
    `llmos.audit.<service>` (llmos.natsauth), so the subject, not the payload, says who wrote."""
    return subject.removeprefix(_AUDIT_PREFIX)


def subscriptions(store: AuditStore) -> list[Subscription[events_pb2.AuditEvent]]:
    async def on_audit_event(subject: str, event: events_pb2.AuditEvent) -> None:
        store.append(event, writer_of(subject))

    return [Subscription(AUDIT_ALL, events_pb2.AuditEvent, subject_handler=on_audit_event, batch_size=64)]
