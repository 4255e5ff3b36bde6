"""Bus handlers of the inference service: chunks published on `llmos.chunks.created`.

Two durable consumers read the subject. The interactive lane handles only interactive
documents (a live update) and skips the rest at bus speed, so it is never behind a bulk
backlog; the bulk lane handles everything else, many messages at once so the embed batcher
can fill its batches across documents.
"""

from __future__ import annotations

from llmos.bus.broker import Subscription
from llmos.bus.subjects import CHUNKS_CREATED
from llmos.v1 import common_pb2, events_pb2
from services.inference.core import InferenceCore

INTERACTIVE_LANE = "interactive"
INTERACTIVE_WORKERS = 4
# Pulled at once: the lane skips a bulk burst in few round trips.
INTERACTIVE_PULL = 32


def subscriptions(core: InferenceCore, bulk_workers: int) -> list[Subscription[events_pb2.ChunksCreated]]:
    async def on_bulk_chunks(created: events_pb2.ChunksCreated) -> None:
        if created.priority != common_pb2.PRIORITY_INTERACTIVE:
            await core.embed_chunks(created)

    async def on_interactive_chunks(created: events_pb2.ChunksCreated) -> None:
        if created.priority == common_pb2.PRIORITY_INTERACTIVE:
            await core.embed_chunks(created)

    return [
        Subscription(CHUNKS_CREATED, events_pb2.ChunksCreated, on_bulk_chunks, max_workers=bulk_workers),
        Subscription(
            CHUNKS_CREATED,
            events_pb2.ChunksCreated,
            on_interactive_chunks,
            batch_size=INTERACTIVE_PULL,
            max_workers=INTERACTIVE_WORKERS,
            lane=INTERACTIVE_LANE,
        ),
    ]
