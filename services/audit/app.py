"""How the audit service is assembled: the chained store, its consumer and its gRPC API."""

from __future__ import annotations

import asyncio

from llmos.bus.broker import Bus
from llmos.service import GrpcBinding, ServiceDefinition, ServiceParts
from llmos.v1 import audit_pb2, audit_pb2_grpc
from services.audit.core import AuditStore
from services.audit.handlers import subscriptions
from services.audit.servicer import AuditServicer
from services.audit.settings import AuditSettings


async def build(settings: AuditSettings, bus: Bus) -> ServiceParts:
    store = AuditStore(
        settings.audit_db_path, settings.chain_keys, settings.checkpoint_path, settings.audit_checkpoint_interval_s
    )

    async def save_checkpoints() -> None:
        # The last records before a quiet spell get their checkpoint written too.
        while True:
            await asyncio.sleep(settings.audit_checkpoint_interval_s)
            store.save_checkpoint()

    saver = asyncio.create_task(save_checkpoints())

    async def close() -> None:
        saver.cancel()
        store.close()

    return ServiceParts(
        grpc=[
            GrpcBinding.of(
                audit_pb2,
                "AuditService",
                AuditServicer(store, settings.audit_max_page_size),
                audit_pb2_grpc.add_AuditServiceServicer_to_server,
            )
        ],
        subscriptions=subscriptions(store),
        close=close,
    )


DEFINITION = ServiceDefinition("audit", AuditSettings, build)
