"""Bus handlers of the retrieval service.

- `llmos.chunks.embedded`: index the chunks, then publish `llmos.docs.indexed`. Two lanes, as in
  ingest and inference: interactive documents have their own consumer and never wait behind a
  bulk backlog.
- `llmos.docs.deleted`: remove the document's chunks.

With an embedded engine every replica holds its own index, so each consumes every message
through durable consumers named after the replica; with a Qdrant server the replicas share
one index and so one set of durable consumers (a queue group).
"""

from __future__ import annotations

from typing import Any

from llmos.bus.broker import Bus, Subscription
from llmos.bus.subjects import CHUNKS_EMBEDDED, DOCS_DELETED, DOCS_INDEXED
from llmos.v1 import common_pb2, events_pb2
from services.retrieval.core import RetrievalCore

INTERACTIVE_LANE = "interactive"
# The interactive lane pulls many messages at once: it skips a bulk burst in few round trips.
INTERACTIVE_PULL = 32
INTERACTIVE_WORKERS = 4


def _lane(replica: str, lane: str) -> str:
    return "-".join(part for part in (replica, lane) if part)


def subscriptions(core: RetrievalCore, bus: Bus, replica: str) -> list[Subscription[Any]]:
    """`replica` is empty when replicas share the index, else this replica's name."""

    async def index(message: events_pb2.ChunksEmbedded) -> None:
        indexed = await core.index_embedded(message)
        if indexed is not None:
            # One event per version however many replicas index it: JetStream drops duplicates.
            await bus.publish(DOCS_INDEXED, indexed, msg_id=f"{indexed.tenant}/{indexed.document_id}/{indexed.content_hash}/indexed")

    async def on_interactive(message: events_pb2.ChunksEmbedded) -> None:
        if message.priority == common_pb2.PRIORITY_INTERACTIVE:
            await index(message)

    async def on_bulk(message: events_pb2.ChunksEmbedded) -> None:
        if message.priority != common_pb2.PRIORITY_INTERACTIVE:
            await index(message)

    async def on_deleted(message: events_pb2.DocumentDeleted) -> None:
        await core.delete_document(message)

    return [
        Subscription(CHUNKS_EMBEDDED, events_pb2.ChunksEmbedded, on_bulk, batch_size=16, lane=_lane(replica, "")),
        Subscription(
            CHUNKS_EMBEDDED,
            events_pb2.ChunksEmbedded,
            on_interactive,
            batch_size=INTERACTIVE_PULL,
            max_workers=INTERACTIVE_WORKERS,
            lane=_lane(replica, INTERACTIVE_LANE),
        ),
        Subscription(DOCS_DELETED, events_pb2.DocumentDeleted, on_deleted, lane=_lane(replica, "")),
    ]
