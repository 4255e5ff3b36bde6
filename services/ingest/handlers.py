"""Bus handlers of the ingest service.

- `llmos.ingest.requested.<tenant>`: a tenant's documents, published by that tenant's publisher
  user (`llmos keys publisher`), the only user NATS lets publish there. The tenant is the
  subject's; a payload naming another tenant is dead-lettered, one naming none gets the subject's.
- `llmos.ingest.requested`: documents the platform's admin publishes for any tenant (only the
  admin user may publish there), the tenant named in the payload.
- Both have an interactive and a bulk lane (llmos.bus.broker.priority_lanes), so a live update
  never waits behind a bulk backlog.
- `llmos.chunks.embedded` and `llmos.docs.indexed`: reports from later stages that move a
  document's status to EMBEDDED and INDEXED.
"""

from __future__ import annotations

from typing import Any

from llmos.auth import Principal
from llmos.bus.broker import Subscription, priority_lanes
from llmos.bus.subjects import CHUNKS_EMBEDDED, DOCS_INDEXED, INGEST_REQUESTED, INGEST_REQUESTED_BY_TENANT
from llmos.errors import InvalidArgument
from llmos.v1 import common_pb2, events_pb2
from services.ingest.core import IngestCore

_TENANT_SUBJECT_PREFIX = INGEST_REQUESTED_BY_TENANT.removesuffix("*")


def publishing_tenant(subject: str, document: events_pb2.DocumentSubmitted) -> str:
    """The tenant `subject` publishes for; the payload may repeat it but not name another."""
    tenant = subject.removeprefix(_TENANT_SUBJECT_PREFIX)
    if not subject.startswith(_TENANT_SUBJECT_PREFIX) or not tenant or "." in tenant:
        raise InvalidArgument("subject", f"{subject!r} is not {_TENANT_SUBJECT_PREFIX}<tenant>")
    if document.tenant and document.tenant != tenant:
        raise InvalidArgument(
            "tenant", f"the document names tenant {document.tenant!r} but was published on {subject}, for {tenant!r} only"
        )
    return tenant


# Documents the bulk lane fetches per pull request (at most its workers): one round trip per document
# otherwise.
BULK_PULL = 16


def subscriptions(core: IngestCore, bulk_workers: int) -> list[Subscription[Any]]:
    async def submit_as_admin(document: events_pb2.DocumentSubmitted) -> None:
        # Only the admin user may publish here (llmos.natsauth): it acts for any tenant.
        await core.submit(Principal(f"bus:{INGEST_REQUESTED}", document.tenant, frozenset({"service"})), document)

    async def submit_for_tenant(subject: str, document: events_pb2.DocumentSubmitted) -> None:
        document.tenant = publishing_tenant(subject, document)
        # The audit trail names the subject, and so the tenant's publisher, as the actor.
        await core.submit(Principal(f"bus:{subject}", document.tenant, frozenset({"service"})), document)

    async def on_embedded(embedded: events_pb2.ChunksEmbedded) -> None:
        await core.advance(
            embedded.tenant, embedded.document_id, embedded.content_hash, common_pb2.DOCUMENT_STAGE_EMBEDDED, 0
        )

    async def on_indexed(indexed: events_pb2.DocumentIndexed) -> None:
        await core.advance(
            indexed.tenant, indexed.document_id, indexed.content_hash, common_pb2.DOCUMENT_STAGE_INDEXED, indexed.chunk_count
        )

    return [
        *priority_lanes(INGEST_REQUESTED, events_pb2.DocumentSubmitted, submit_as_admin, bulk_workers=bulk_workers,
                        bulk_batch_size=min(BULK_PULL, bulk_workers)),
        *priority_lanes(
            INGEST_REQUESTED_BY_TENANT, events_pb2.DocumentSubmitted, subject_handler=submit_for_tenant,
            bulk_workers=bulk_workers, bulk_batch_size=min(BULK_PULL, bulk_workers),
        ),
        Subscription(CHUNKS_EMBEDDED, events_pb2.ChunksEmbedded, on_embedded, batch_size=16, max_workers=4),
        Subscription(DOCS_INDEXED, events_pb2.DocumentIndexed, on_indexed, batch_size=16, max_workers=4),
    ]
