from __future__ import annotations

from pydantic import field_validator

from llmos.errors import InvalidArgument
from llmos.pii import PiiPolicy
from llmos.settings import PlatformSettings


class IngestSettings(PlatformSettings):
    # Chunk size and overlap, in tokens of the generation model's tokenizer.
    ingest_chunk_tokens: int = 256
    ingest_chunk_overlap_tokens: int = 32
    # Largest document accepted, in bytes (NATS carries it whole: keep under its max_payload).
    ingest_max_document_bytes: int = 4 * 1024 * 1024
    # Personal data to redact before chunking, per tenant: `tenant=kind|kind,…`, `*` for the
    # rest, `none` for nothing; kinds: email, phone, card, iban (see llmos.pii).
    ingest_pii_policy: str = "*=email|phone|card|iban"
    # A tenant's published contact details, kept by redaction: `tenant=value|value,…` (its
    # help centre's e-mail addresses and phone numbers are what customers ask for).
    ingest_pii_public: str = ""
    # Documents of the bulk lane (standard and batch priority) processed at once; interactive
    # documents have their own consumer and never wait behind them.
    ingest_bulk_workers: int = 4

    @field_validator("ingest_pii_policy")
    @classmethod
    def _valid_policy(cls, value: str) -> str:
        try:
            PiiPolicy.parse(value)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("ingest_pii_public")
    @classmethod
    def _valid_public(cls, value: str) -> str:
        try:
            PiiPolicy.parse("", value)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("ingest_bulk_workers")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value
