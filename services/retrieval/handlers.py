"""Bus handlers of the retrieval service.

- `llmos.chunks.embedded`: index the chunks, then publish `llmos.docs.indexed`. An interactive and
  a bulk lane (llmos.bus.broker.priority_lanes), as in ingest and inference. The bulk lane's
  documents are indexed together (services.retrieval.gather): those that arrive while the index
  is busy go in one upsert, up to BULK_GATHER documents; an interactive document is indexed alone,
  so it waits behind one such call at most.
- `llmos.docs.deleted`: remove the document's chunks.

With an embedded engine every replica holds its own index, so each consumes every message
through durable consumers named after the replica; with a Qdrant server the replicas share
one index and so one set of durable consumers (a queue group).
"""

from __future__ import annotations

from typing import Any

from llmos.bus.broker import Bus, Subscription, priority_lanes
from llmos.bus.subjects import CHUNKS_EMBEDDED, DOCS_DELETED, DOCS_INDEXED
from llmos.v1 import common_pb2, events_pb2
from services.retrieval.core import RetrievalCore
from services.retrieval.gather import Gatherer

# Bulk documents fetched per pull, and indexed in one call at most: small enough that a live
# document queued behind such a call still waits only a fraction of its second.
BULK_PULL = 16
BULK_GATHER = 8


def subscriptions(core: RetrievalCore, bus: Bus, replica: str) -> list[Subscription[Any]]:
    """`replica` is empty when replicas share the index, else this replica's name."""
    bulk = Gatherer[events_pb2.ChunksEmbedded, events_pb2.DocumentIndexed | None](
        core.index_embedded_many, BULK_GATHER, key=lambda message: (message.tenant, message.document_id)
    )

    async def index(message: events_pb2.ChunksEmbedded) -> None:
        if message.priority == common_pb2.PRIORITY_INTERACTIVE:
            indexed = await core.index_embedded(message)
        else:
            indexed = await bulk.submit(message)
        if indexed is not None:
            # One event per version however many replicas index it: JetStream drops duplicates.
            await bus.publish(DOCS_INDEXED, indexed, msg_id=f"{indexed.tenant}/{indexed.document_id}/{indexed.content_hash}/indexed")

    async def on_deleted(message: events_pb2.DocumentDeleted) -> None:
        await core.delete_document(message)

    return [
        *priority_lanes(CHUNKS_EMBEDDED, events_pb2.ChunksEmbedded, index, bulk_batch_size=BULK_PULL, replica=replica),
        Subscription(DOCS_DELETED, events_pb2.DocumentDeleted, on_deleted, lane=replica),
    ]
