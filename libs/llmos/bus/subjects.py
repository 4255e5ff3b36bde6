"""Subjects, streams and KV buckets of the bus, as named in DESIGN.md.

Subjects are `llmos.<domain>.<event>`; each domain has one JetStream stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmos.errors import InvalidArgument

# Documents published by the platform's admin, naming their tenant in the payload.
INGEST_REQUESTED = "llmos.ingest.requested"
# Documents published for one tenant: the last token is the tenant, and only that tenant's
# publisher user (llmos.natsauth) may publish there.
INGEST_REQUESTED_BY_TENANT = "llmos.ingest.requested.*"
CHUNKS_CREATED = "llmos.chunks.created"
CHUNKS_EMBEDDED = "llmos.chunks.embedded"
DOCS_INDEXED = "llmos.docs.indexed"
DOCS_FAILED = "llmos.docs.failed"
DOCS_DELETED = "llmos.docs.deleted"
DOCS_EVENTS = "llmos.docs.*"  # indexed, failed and deleted
DIALOGUE_TURN_COMPLETED = "llmos.dialogue.turn.completed"
DIALOGUE_HANDOFF_REQUESTED = "llmos.dialogue.handoff.requested"
SPEECH_RECOGNIZED = "llmos.speech.recognized"
SPEECH_SYNTHESIZED = "llmos.speech.synthesized"
AUDIT_ALL = "llmos.audit.>"
DLQ_PREFIX = "llmos.dlq."


def audit_subject(service: str) -> str:
    return f"llmos.audit.{service}"


def dead_letter_subject(subject: str) -> str:
    return DLQ_PREFIX + subject


# A name that is one subject token and one NATS user-name part: no '.', wildcard or space.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")


def check_token(field: str, value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise InvalidArgument(field, f"{value[:64]!r} must be 1 to 256 letters, digits, '_' or '-' to name a subject")
    return value


def ingest_requested(tenant: str) -> str:
    """The subject on which `tenant`'s documents are published for ingestion."""
    return f"{INGEST_REQUESTED}.{check_token('tenant', tenant)}"


INTERACTIVE_LANE = "interactive"


def durable_name(service: str, subject: str, lane: str = "") -> str:
    """The durable consumer shared by every replica of `service` for `subject` (and `lane`); the
    NATS grants (llmos.natsauth) allow each service its own names only."""
    name = f"{service}-{subject.replace('.', '-').replace('>', 'all').replace('*', 'any')}"
    return f"{name}-{lane}" if lane else name


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age_s: int  # how long messages are kept; consumers catch up within it
    description: str
    max_msg_size: int = -1  # largest message the stream takes, in bytes (-1: the server's max_payload)
    max_bytes: int = -1  # size of the stream, in bytes, past which the oldest messages go (-1: no limit)


DAY_S = 24 * 3600

STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("INGEST", ("llmos.ingest.>",), 7 * DAY_S, "documents submitted for ingestion"),
    StreamSpec("CHUNKS", ("llmos.chunks.>",), 7 * DAY_S, "chunks created and embedded"),
    StreamSpec("DOCS", ("llmos.docs.>",), 7 * DAY_S, "document lifecycle: indexed, failed, deleted"),
    StreamSpec("DIALOGUE", ("llmos.dialogue.>",), 7 * DAY_S, "turns completed and hand-offs"),
    StreamSpec("SPEECH", ("llmos.speech.>",), 7 * DAY_S, "recognition and synthesis events"),
    # Records are bounded (llmos.audit.MAX_AUDIT_TEXT_CHARS per field), so 64 KiB holds any of
    # them; at 1 GiB the oldest go first, long stored by the audit service unless it lagged that far.
    StreamSpec(
        "AUDIT", ("llmos.audit.>",), 30 * DAY_S, "audit events waiting for the audit service",
        max_msg_size=64 * 1024, max_bytes=1024**3,
    ),
    StreamSpec("DLQ", ("llmos.dlq.>",), 30 * DAY_S, "messages that kept failing, with their error"),
)


@dataclass(frozen=True)
class BucketSpec:
    name: str
    ttl_s: int  # 0: entries never expire
    description: str


BUCKETS: tuple[BucketSpec, ...] = (
    BucketSpec("dialogue_sessions", 24 * 3600, "multi-turn dialogue state, expiring when idle"),
    BucketSpec("user_profiles", 0, "documents each user read or asked about, for recommendations"),
    BucketSpec("document_status", 0, "each document's stage in the ingestion pipeline"),
    BucketSpec("api_keys", 0, "issued API keys by SHA-256 digest (never the keys themselves)"),
)


def stream_for(subject: str) -> StreamSpec:
    for spec in STREAMS:
        if any(subject.startswith(pattern.rstrip(">")) for pattern in spec.subjects):
            return spec
    raise KeyError(f"no stream holds subject {subject!r}")
