"""The ingest core's defences: unambiguous chunk ids, bounded metadata."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest

from llmos.audit import AuditLog
from llmos.auth import Principal
from llmos.errors import InvalidArgument
from llmos.pii import PiiPolicy
from llmos.testing import MemoryBucket, MemoryPublisher
from llmos.v1 import events_pb2
from services.ingest.core import DocumentStatusStore, IngestCore
from services.ingest.settings import IngestSettings

pytestmark = pytest.mark.unit


async def word_offsets(text: str) -> Sequence[tuple[int, int]]:
    return [(match.start(), match.end()) for match in re.finditer(r"\S+", text)]


def ingest_core(
    publisher: MemoryPublisher | None = None, pii: str = "*=none", **extraction: Any
) -> IngestCore:
    """The core with the default settings' limits, in memory (`extraction`: workers=, extract=)."""
    return IngestCore(
        publisher or MemoryPublisher(),
        DocumentStatusStore(MemoryBucket()),
        AuditLog(MemoryPublisher(), "ingest"),
        word_offsets,
        chunk_tokens=64,
        overlap_tokens=8,
        limits=IngestSettings().document_limits(),
        pii=PiiPolicy.parse(pii),
        **extraction,
    )


OPERATOR = Principal("olga", "acme", frozenset({"operator"}))


def document(**fields: object) -> events_pb2.DocumentSubmitted:
    return events_pb2.DocumentSubmitted(tenant="acme", document_id="faq", content=b"Returns are free.", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"title": "t" * 513}, "title"),
        ({"source": "s" * 2049}, "source"),
        ({"tags": ["t"] * 65}, "tags"),
        ({"tags": ["ok", "t" * 129]}, "tags[1]"),
        ({"tenant": "a" * 257}, "tenant"),
    ],
    ids=["title", "source", "tag count", "tag length", "tenant"],
)
async def test_oversized_metadata_is_invalid_argument_naming_the_field(fields: dict[str, object], field: str) -> None:
    submitted = document()
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(submitted, name).extend(value)
        else:
            setattr(submitted, name, value)
    with pytest.raises(InvalidArgument, match="over the limit") as error:
        await ingest_core().submit(OPERATOR, submitted)
    assert error.value.field == field


async def test_metadata_at_the_limits_is_accepted() -> None:
    submitted = document(title="t" * 512, source="s" * 2048)
    submitted.tags.extend(["t" * 128] * 64)
    result = await ingest_core().submit(OPERATOR, submitted)
    assert not result.unchanged
