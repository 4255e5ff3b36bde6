"""How the ingest service is assembled: core, tokenizer client, gRPC servicer, bus handlers."""

from __future__ import annotations

from collections.abc import Sequence

from llmos.audit import AuditLog
from llmos.bus.broker import Bus
from llmos.clients import TokenizerClient
from llmos.grpcutil.client import service_channel
from llmos.pii import PiiPolicy
from llmos.service import GrpcBinding, ServiceDefinition, ServiceParts
from llmos.v1 import ingest_pb2, ingest_pb2_grpc
from services.ingest.core import STATUS_BUCKET, DocumentStatusStore, IngestCore
from services.ingest.handlers import subscriptions
from services.ingest.servicer import IngestServicer
from services.ingest.settings import IngestSettings
from services.ingest.worker import ExtractionWorkers

TOKENIZE_TIMEOUT_S = 30.0


async def build(settings: IngestSettings, bus: Bus) -> ServiceParts:
    channel = service_channel(settings, "ingest", "tokenizer")
    tokenizer = TokenizerClient(channel)

    async def token_offsets(text: str) -> Sequence[tuple[int, int]]:
        return await tokenizer.token_offsets(text, TOKENIZE_TIMEOUT_S)

    workers = ExtractionWorkers(settings.ingest_extract_workers, settings.ingest_extract_timeout_s)
    workers.start()

    async def close() -> None:
        await workers.close()
        await channel.close()

    async def status_keys(prefix: str) -> list[str]:
        # The bucket stream's subjects (one per key ever written): one request, no watcher.
        subjects = f"$KV.{STATUS_BUCKET}."
        info = await bus.jetstream.stream_info(f"KV_{STATUS_BUCKET}", subjects_filter=f"{subjects}{prefix}>")
        return [subject[len(subjects):] for subject in info.state.subjects or {}]

    core = IngestCore(
        bus,
        DocumentStatusStore(bus.bucket(STATUS_BUCKET), status_keys),
        AuditLog(bus, bus.service),
        token_offsets,
        settings.ingest_chunk_tokens,
        settings.ingest_chunk_overlap_tokens,
        settings.document_limits(),
        PiiPolicy.parse(settings.ingest_pii_policy, settings.ingest_pii_public),
        workers,
    )
    return ServiceParts(
        grpc=[
            GrpcBinding.of(
                ingest_pb2,
                "IngestService",
                IngestServicer(core),
                ingest_pb2_grpc.add_IngestServiceServicer_to_server,
            )
        ],
        subscriptions=subscriptions(core, settings.ingest_bulk_workers),
        close=close,
    )


DEFINITION = ServiceDefinition("ingest", IngestSettings, build)
