"""Audit events: every service records who did what on `llmos.audit.<service>`.

Events wait in the AUDIT stream until the audit service stores them, so losing the audit
service loses nothing.
"""

from __future__ import annotations

import uuid

from google.protobuf.timestamp_pb2 import Timestamp

from llmos.auth import Principal
from llmos.bus.subjects import audit_subject
from llmos.ports import Publisher
from llmos.redaction import redact
from llmos.telemetry import current_trace_id
from llmos.v1 import events_pb2

ALLOW = events_pb2.AUDIT_DECISION_ALLOW
DENY = events_pb2.AUDIT_DECISION_DENY


def audit_event(
    service: str,
    principal: str,
    tenant: str,
    action: str,
    resource: str,
    decision: events_pb2.AuditDecision.ValueType,
    reason: str = "",
) -> events_pb2.AuditEvent:
    """An event stamped with a fresh id, the current time and the current trace; free text in it
    (resource, reason) has personal data redacted."""
    time = Timestamp()
    time.GetCurrentTime()
    return events_pb2.AuditEvent(
        event_id=uuid.uuid4().hex,
        time=time,
        principal=principal,
        tenant=tenant,
        service=service,
        action=action,
        resource=redact(resource),
        decision=decision,
        reason=redact(reason),
        trace_id=current_trace_id(),
    )


class AuditLog:
    """Publishes the audit events of one service."""

    def __init__(self, publisher: Publisher, service: str) -> None:
        self._publisher = publisher
        self._service = service

    async def record(
        self,
        principal: Principal,
        tenant: str,
        action: str,
        resource: str,
        decision: events_pb2.AuditDecision.ValueType = ALLOW,
        reason: str = "",
    ) -> None:
        event = audit_event(self._service, principal.subject, tenant, action, resource, decision, reason)
        await self._publisher.publish(audit_subject(self._service), event, msg_id=event.event_id)
