"""The gateway's audit trail on `llmos.audit.gateway`, kept like the services keep theirs
(`llmos.grpcutil.interceptors`): every refusal, and every allowed request touching a tenant's data;
an allowed request whose record cannot be published is refused (fail closed)."""

from __future__ import annotations

import logging

from llmos import errors
from llmos.audit import ALLOW, audit_event
from llmos.auth import Principal
from llmos.bus.subjects import audit_subject
from llmos.ports import Publisher
from llmos.settings import GATEWAY
from llmos.v1 import events_pb2

logger = logging.getLogger(__name__)
SERVICE = GATEWAY


class GatewayAudit:
    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher

    async def record(
        self, principal: Principal | None, action: str, resource: str, decision: events_pb2.AuditDecision.ValueType, reason: str
    ) -> None:
        event = audit_event(
            SERVICE, principal.subject if principal else "anonymous", principal.tenant if principal else "", action, resource, decision, reason
        )
        try:
            await self._publisher.publish(audit_subject(SERVICE), event, msg_id=event.event_id)
        except Exception as exc:  # noqa: BLE001 - whatever the bus raised, the record is lost
            logger.exception("could not publish the audit event of %s", action)
            if decision == ALLOW:
                raise errors.Unavailable(f"{action} was refused: its audit record could not be published; retry later") from exc
