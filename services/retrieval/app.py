"""How the retrieval service is assembled: index engine, BM25, query embedder, profiles,
gRPC servicer and bus handlers."""

from __future__ import annotations

import re

from llmos.bus.broker import Bus
from llmos.clients import InferenceClient
from llmos.crypto import AtRest
from llmos.grpcutil.client import service_channel
from llmos.service import GrpcBinding, ServiceDefinition, ServiceParts
from llmos.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.retrieval.core import RetrievalCore, SearchLimits
from services.retrieval.embedder import InferenceEmbedder
from services.retrieval.handlers import subscriptions
from services.retrieval.index import ChunkIndex, ClientIndex, EdgeIndex, SealedTextIndex
from services.retrieval.profiles import PROFILES_BUCKET, KvProfileStore
from services.retrieval.servicer import RetrievalServicer
from services.retrieval.settings import RetrievalSettings
from services.retrieval.sparse import Bm25Encoder



def open_index(settings: RetrievalSettings) -> ChunkIndex:
    """The Qdrant server when configured, else this replica's embedded index."""
    if settings.qdrant_url:
        return ClientIndex(
            settings.retrieval_collection,
            settings.retrieval_dimensions,
            url=settings.qdrant_url,
            api_key=settings.qdrant_api_key,
            layout=settings.qdrant_layout,
        )
    replica = re.sub(r"[^A-Za-z0-9_-]", "_", settings.retrieval_replica)
    folder = settings.home / "qdrant" / f"{settings.retrieval_embedded_engine}-{replica}"
    if settings.retrieval_embedded_engine == "edge":
        return EdgeIndex(folder, settings.retrieval_dimensions, settings.retrieval_bm25_avg_len)
    return ClientIndex(settings.retrieval_collection, settings.retrieval_dimensions, path=folder)


def consumer_replica(settings: RetrievalSettings) -> str:
    """Durable-consumer suffix: shared with a server, one per replica with an embedded index."""
    return "" if settings.qdrant_url else re.sub(r"[^A-Za-z0-9_-]", "_", f"replica-{settings.retrieval_replica}")



def search_limits(settings: RetrievalSettings) -> SearchLimits:
    return SearchLimits(
        default_top_k=settings.retrieval_default_top_k,
        max_top_k=settings.retrieval_max_top_k,
        candidates=settings.retrieval_candidates,
        rrf_k=settings.retrieval_rrf_k,
        max_query_chars=settings.retrieval_max_query_chars,
        page_size=settings.retrieval_page_size,
        max_page_size=settings.retrieval_max_page_size,
    )

async def build(settings: RetrievalSettings, bus: Bus) -> ServiceParts:
    channel = service_channel(settings, "retrieval", "inference")
    core = RetrievalCore(
        SealedTextIndex(open_index(settings), AtRest.from_settings(settings, "chunk text in the index")),
        Bm25Encoder(settings.retrieval_bm25_avg_len),
        InferenceEmbedder(InferenceClient(channel), settings.retrieval_dimensions, settings.retrieval_embed_timeout_s),
        KvProfileStore(bus.bucket(PROFILES_BUCKET), settings.retrieval_profile_items),
        settings.retrieval_dimensions,
        search_limits(settings),
    )

    async def close() -> None:
        await channel.close()
        core.close()

    return ServiceParts(
        grpc=[
            GrpcBinding.of(
                retrieval_pb2, "RetrievalService", RetrievalServicer(core), retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server
            )
        ],
        subscriptions=subscriptions(core, bus, consumer_replica(settings)),
        close=close,
    )


DEFINITION = ServiceDefinition("retrieval", RetrievalSettings, build)
