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

# Longest text kept in one field of a record: a caller's megabyte `document_id` is neither
# redacted, carried nor stored whole (and cannot push the record over the bus's payload limit).
MAX_AUDIT_TEXT_CHARS = 1024
# How far past the cut text is redacted, so personal data straddling the cut is replaced whole
# instead of half kept (longer than the longest finding: an e-mail address is at most 254).
_REDACTION_MARGIN_CHARS = 320


def bounded(text: str, limit: int = MAX_AUDIT_TEXT_CHARS) -> str:
    """`text` cut to `limit` characters, marked with the length it had."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[cut from {len(text)} characters]"


def bounded_redacted(text: str, limit: int = MAX_AUDIT_TEXT_CHARS) -> str:
    """Personal data redacted and `text` cut to `limit` characters, marked with the length it had.

    Only the head is redacted, so the work is bounded too whatever the caller sent.
    """
    if len(text) <= limit:
        return redact(text)
    head = redact(text[: limit + _REDACTION_MARGIN_CHARS])[:limit]
    return f"{head}…[cut from {len(text)} characters]"


def audit_event(
    service: str,
    principal: str,
    tenant: str,
    action: str,
    resource: str,
    decision: events_pb2.AuditDecision.ValueType,
    reason: str = "",
) -> events_pb2.AuditEvent:
    """An event stamped with a fresh id, the current time and the current trace; every text in it
    is cut to a bounded length (the tenant of a dead-lettered payload, a caller's resource ids) and
    free text (resource, reason) has personal data redacted."""
    time = Timestamp()
    time.GetCurrentTime()
    return events_pb2.AuditEvent(
        event_id=uuid.uuid4().hex,
        time=time,
        principal=bounded(principal),
        tenant=bounded(tenant),
        service=bounded(service),
        action=bounded(action),
        resource=bounded_redacted(resource),
        decision=decision,
        reason=bounded_redacted(reason),
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
