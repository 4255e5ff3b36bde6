from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt, model_validator

from llmos.settings import PlatformSettings
from services.retrieval.index import CollectionLayout


class RetrievalSettings(PlatformSettings):
    # The Qdrant collection (server) holding every tenant's chunks.
    retrieval_collection: str = "llmos_chunks"
    # Embedded engine when LLMOS_QDRANT_URL is empty: `edge` (qdrant-edge-py) or `local`
    # (qdrant-client local mode); chosen by bench.ingest.embedded_qdrant, see the README.
    retrieval_embedded_engine: Literal["edge", "local"] = "edge"
    # This replica's name. With an embedded engine each replica keeps its own copy of the index
    # under LLMOS_HOME/qdrant/<replica> and its own durable consumers, so it sees every message;
    # give each replica a distinct, stable name. With a Qdrant server replicas share one consumer.
    retrieval_replica: str = "0"
    qdrant_api_key: str = ""
    # How the collection is laid out on a Qdrant cluster, when retrieval creates it (a server
    # only: the embedded engines are one process and ignore them). Shards spread the points over
    # the nodes; each shard is kept on `replication_factor` nodes; a write is acknowledged once
    # `write_consistency_factor` of them have it. A collection that exists keeps its layout.
    qdrant_shard_number: PositiveInt = 1
    qdrant_replication_factor: PositiveInt = 1
    qdrant_write_consistency_factor: PositiveInt = 1
    # Dense vector size: the embedding model's (all-MiniLM-L6-v2: 384).
    retrieval_dimensions: int = 384
    # BM25: expected document length in words for length normalization (Qdrant's default).
    retrieval_bm25_avg_len: float = 256.0
    retrieval_default_top_k: int = 10
    retrieval_max_top_k: int = 1000
    # Candidates taken from each of dense and sparse before reciprocal rank fusion.
    retrieval_candidates: int = 100
    retrieval_rrf_k: int = 60
    retrieval_max_query_chars: int = 4096
    retrieval_page_size: int = 20
    retrieval_max_page_size: int = 200
    # Documents remembered per user and kind (read, asked about) for Recommend.
    retrieval_profile_items: int = 50
    retrieval_embed_timeout_s: float = 10.0

    @model_validator(mode="after")
    def _writes_within_replicas(self) -> RetrievalSettings:
        if self.qdrant_write_consistency_factor > self.qdrant_replication_factor:
            raise ValueError(
                f"LLMOS_QDRANT_WRITE_CONSISTENCY_FACTOR ({self.qdrant_write_consistency_factor}) cannot exceed "
                f"LLMOS_QDRANT_REPLICATION_FACTOR ({self.qdrant_replication_factor}): no write could be acknowledged"
            )
        return self

    @property
    def qdrant_layout(self) -> CollectionLayout:
        return CollectionLayout(self.qdrant_shard_number, self.qdrant_replication_factor, self.qdrant_write_consistency_factor)
