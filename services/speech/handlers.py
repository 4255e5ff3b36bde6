"""Bus handlers of the speech service: documents indexed or deleted rebuild domain models."""

from __future__ import annotations

from typing import Any

from llmos.auth import acting_as, event_principal
from llmos.bus.broker import Subscription
from llmos.bus.subjects import DOCS_DELETED, DOCS_INDEXED
from llmos.v1 import events_pb2
from services.speech.core import SpeechCore


def subscriptions(core: SpeechCore) -> list[Subscription[Any]]:
    async def indexed(event: events_pb2.DocumentIndexed) -> None:
        # The document is read from retrieval for the event's tenant, and that tenant only.
        with acting_as(event_principal(DOCS_INDEXED, event.tenant)):
            await core.document_indexed(event)

    return [
        Subscription(DOCS_INDEXED, events_pb2.DocumentIndexed, indexed),
        Subscription(DOCS_DELETED, events_pb2.DocumentDeleted, core.document_deleted),
    ]
