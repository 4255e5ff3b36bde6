"""Bus handlers of the ingest service.

- `llmos.ingest.requested`: an interactive and a bulk lane (llmos.bus.broker.priority_lanes), so
  a live update never waits behind a bulk backlog.
- `llmos.chunks.embedded` and `llmos.docs.indexed`: reports from later stages that move a
  document's status to EMBEDDED and INDEXED.
"""

from __future__ import annotations

from typing import Any

from llmos.auth import Principal
from llmos.bus.broker import Subscription, priority_lanes
from llmos.bus.subjects import CHUNKS_EMBEDDED, DOCS_INDEXED, INGEST_REQUESTED
from llmos.v1 import common_pb2, events_pb2
from services.ingest.core import IngestCore

def subscriptions(core: IngestCore, bulk_workers: int) -> list[Subscription[Any]]:
    async def submit(document: events_pb2.DocumentSubmitted) -> None:
        # Who may publish here is enforced by NATS subject permissions; the audit trail names
        # the subject as the actor.
        publisher = Principal(f"bus:{INGEST_REQUESTED}", document.tenant, frozenset({"service"}))
        await core.submit(publisher, document)

    async def on_embedded(embedded: events_pb2.ChunksEmbedded) -> None:
        await core.advance(
            embedded.tenant, embedded.document_id, embedded.content_hash, common_pb2.DOCUMENT_STAGE_EMBEDDED, 0
        )

    async def on_indexed(indexed: events_pb2.DocumentIndexed) -> None:
        await core.advance(
            indexed.tenant, indexed.document_id, indexed.content_hash, common_pb2.DOCUMENT_STAGE_INDEXED, indexed.chunk_count
        )

    return [
        *priority_lanes(INGEST_REQUESTED, events_pb2.DocumentSubmitted, submit, bulk_workers=bulk_workers),
        Subscription(CHUNKS_EMBEDDED, events_pb2.ChunksEmbedded, on_embedded, batch_size=16, max_workers=4),
        Subscription(DOCS_INDEXED, events_pb2.DocumentIndexed, on_indexed, batch_size=16, max_workers=4),
    ]
