from __future__ import annotations

from pydantic import field_validator

from llmos.errors import InvalidArgument
from llmos.pii import PiiPolicy
from llmos.settings import PlatformSettings
from services.ingest.core import DocumentLimits
from services.ingest.extract import ExtractionLimits


class IngestSettings(PlatformSettings):
    # Chunk size and overlap, in tokens of the generation model's tokenizer.
    ingest_chunk_tokens: int = 256
    ingest_chunk_overlap_tokens: int = 32
    # Largest document accepted, in bytes (NATS carries it whole: keep under its max_payload).
    ingest_max_document_bytes: int = 4 * 1024 * 1024
    # Metadata is copied into every chunk, so it is bounded too.
    ingest_max_title_chars: int = 512
    ingest_max_source_chars: int = 2048
    ingest_max_tags: int = 64
    ingest_max_tag_chars: int = 128
    # What a PDF may expand to: a few compressed kilobytes can hold gigabytes of text.
    ingest_max_pdf_pages: int = 2000
    ingest_max_text_chars: int = 16 * 1024 * 1024
    # Personal data to redact before chunking, per tenant: `tenant=kind|kind,…`, `*` for the
    # rest, `none` for nothing; kinds: email, phone, card, iban (see llmos.pii).
    ingest_pii_policy: str = "*=email|phone|card|iban"
    # A tenant's published contact details, kept by redaction: `tenant=value|value,…` (its
    # help centre's e-mail addresses and phone numbers are what customers ask for).
    ingest_pii_public: str = ""
    # Documents of the bulk lane (standard and batch priority) processed at once; interactive
    # documents have their own consumer and never wait behind them.
    ingest_bulk_workers: int = 4
    # Extraction and redaction run in worker processes (this many, warm); a document whose
    # extraction runs longer than the timeout has its worker killed and is refused.
    ingest_extract_workers: int = 2
    ingest_extract_timeout_s: float = 30.0

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

    @field_validator(
        "ingest_bulk_workers",
        "ingest_extract_workers",
        "ingest_max_title_chars",
        "ingest_max_source_chars",
        "ingest_max_tags",
        "ingest_max_tag_chars",
        "ingest_max_pdf_pages",
        "ingest_max_text_chars",
    )
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("ingest_extract_timeout_s")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be more than 0")
        return value

    def document_limits(self) -> DocumentLimits:
        return DocumentLimits(
            max_document_bytes=self.ingest_max_document_bytes,
            max_title_chars=self.ingest_max_title_chars,
            max_source_chars=self.ingest_max_source_chars,
            max_tags=self.ingest_max_tags,
            max_tag_chars=self.ingest_max_tag_chars,
            extraction=ExtractionLimits(self.ingest_max_pdf_pages, self.ingest_max_text_chars),
        )
