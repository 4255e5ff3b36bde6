"""Bus handlers of the retrieval service.

- `llmos.chunks.embedded`: index the chunks, then publish `llmos.docs.indexed`. An interactive and
  a bulk lane (llmos.bus.broker.priority_lanes), as in ingest and inference.
- `llmos.docs.deleted`: remove the document's chunks.

With an embedded engine every replica holds its own index, so each consumes every message
through durable consumers named after the replica; with a Qdrant server the replicas share
one index and so one set of durable consumers (a queue group).
"""

from __future__ import annotations

from typing import Any

from llmos.bus.broker import Bus, Subscription, priority_lanes
from llmos.bus.subjects import CHUNKS_EMBEDDED, DOCS_DELETED, DOCS_INDEXED
from llmos.v1 import events_pb2
from services.retrieval.core import RetrievalCore


def subscriptions(core: RetrievalCore, bus: Bus, replica: str) -> list[Subscription[Any]]:
    """`replica` is empty when replicas share the index, else this replica's name."""

    async def index(message: events_pb2.ChunksEmbedded) -> None:
        indexed = await core.index_embedded(message)
        if indexed is not None:
            # One event per version however many replicas index it: JetStream drops duplicates.
            await bus.publish(DOCS_INDEXED, indexed, msg_id=f"{indexed.tenant}/{indexed.document_id}/{indexed.content_hash}/indexed")

    async def on_deleted(message: events_pb2.DocumentDeleted) -> None:
        await core.delete_document(message)

    return [
        *priority_lanes(CHUNKS_EMBEDDED, events_pb2.ChunksEmbedded, index, bulk_batch_size=16, replica=replica),
        Subscription(DOCS_DELETED, events_pb2.DocumentDeleted, on_deleted, lane=replica),
    ]
