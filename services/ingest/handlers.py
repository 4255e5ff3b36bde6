"""Bus handlers of the ingest service: documents published on `llmos.ingest.requested`."""

from __future__ import annotations

from llmos.auth import Principal
from llmos.bus.broker import Subscription
from llmos.bus.subjects import INGEST_REQUESTED
from llmos.v1 import events_pb2
from services.ingest.core import IngestCore


def subscriptions(core: IngestCore) -> list[Subscription[events_pb2.DocumentSubmitted]]:
    async def on_document_submitted(document: events_pb2.DocumentSubmitted) -> None:
        # Who may publish here is enforced by NATS subject permissions; the audit trail names
        # the subject as the actor.
        publisher = Principal(f"bus:{INGEST_REQUESTED}", document.tenant, frozenset({"service"}))
        await core.submit(publisher, document)

    return [Subscription(INGEST_REQUESTED, events_pb2.DocumentSubmitted, on_document_submitted)]
