from __future__ import annotations

from llmos.settings import PlatformSettings


class IngestSettings(PlatformSettings):
    # Chunk size and overlap, in tokens of the generation model's tokenizer.
    ingest_chunk_tokens: int = 256
    ingest_chunk_overlap_tokens: int = 32
    # Largest document accepted, in bytes (NATS carries it whole: keep under its max_payload).
    ingest_max_document_bytes: int = 4 * 1024 * 1024
