"""Bus handlers of the dialogue service: a tenant's knowledge base changed, so its cached searches go."""

from __future__ import annotations

from typing import Any

from llmos.bus.broker import Subscription
from llmos.bus.subjects import DOCS_DELETED, DOCS_INDEXED
from llmos.errors import InvalidArgument
from llmos.v1 import events_pb2
from services.dialogue.core import DialogueCore


def subscriptions(core: DialogueCore) -> list[Subscription[Any]]:
    async def invalidate(event: events_pb2.DocumentIndexed | events_pb2.DocumentDeleted) -> None:
        if not event.tenant:
            raise InvalidArgument("tenant", "a document event must name its tenant")
        core.search_cache.invalidate(event.tenant)

    return [
        Subscription(DOCS_INDEXED, events_pb2.DocumentIndexed, invalidate),
        Subscription(DOCS_DELETED, events_pb2.DocumentDeleted, invalidate),
    ]
