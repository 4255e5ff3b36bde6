"""Bus handlers of the inference service: chunks published on `llmos.chunks.created`.

An interactive and a bulk lane (llmos.bus.broker.priority_lanes): a live update is never
behind a bulk backlog, and the bulk lane handles many messages at once so the embed batcher can
fill its batches across documents.
"""

from __future__ import annotations

from llmos.bus.broker import Subscription, priority_lanes
from llmos.bus.subjects import CHUNKS_CREATED
from llmos.v1 import events_pb2
from services.inference.core import InferenceCore


# Messages the bulk lane fetches per pull request: one round trip to NATS per message (the
# default) cost the server and the service CPU that the embedding model needs.
BULK_PULL = 16


def subscriptions(core: InferenceCore, bulk_workers: int) -> list[Subscription[events_pb2.ChunksCreated]]:
    return priority_lanes(
        CHUNKS_CREATED, events_pb2.ChunksCreated, core.embed_chunks, bulk_workers=bulk_workers,
        bulk_batch_size=min(BULK_PULL, bulk_workers),
    )
