"""The ingest core's defences: unambiguous chunk ids, bounded metadata."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmos.audit import AuditLog
from llmos.auth import Principal
from llmos.errors import InvalidArgument
from llmos.pii import PiiPolicy
from llmos.testing import MemoryBucket, MemoryPublisher
from llmos.v1 import events_pb2
from services.ingest.core import DocumentStatusStore, IngestCore, chunk_id
from services.ingest.settings import IngestSettings

pytestmark = pytest.mark.unit

# Pairs that a plain "tenant/document#index" name runs together.
LOOK_ALIKES = [
    (("acme", "eu/faq", 0), ("acme/eu", "faq", 0)),
    (("acme", "faq#1", 2), ("acme", "faq#12", 0)),
    (("a:b", "c", 0), ("a", "b:c", 0)),
    (("1:a", "b", 0), ("1", "a:b", 0)),
]


@pytest.mark.parametrize(("first", "second"), LOOK_ALIKES)
def test_chunk_ids_of_look_alike_tenants_and_documents_differ(
    first: tuple[str, str, int], second: tuple[str, str, int]
) -> None:
    assert chunk_id(*first) != chunk_id(*second)


@given(st.text(alphabet="a1/#:", min_size=1, max_size=8), st.integers(0, 12))
def test_every_cut_of_a_name_into_tenant_and_document_has_its_own_id(name: str, index: int) -> None:
    """Separators in names (here `/`, `#` and `:`) cannot make one tenant's chunk another's."""
    ids = {chunk_id(name[:cut], name[cut:], index) for cut in range(len(name) + 1)}
    assert len(ids) == len(name) + 1


def test_chunk_ids_are_stable_for_the_same_input() -> None:
    """Re-submitting a document overwrites its chunks only while the ids stay the same, release to release."""
    assert chunk_id("acme", "eu/faq", 3) == chunk_id("acme", "eu/faq", 3)
    assert chunk_id("acme", "eu/faq", 3) == "b2376a5f-0574-5c0d-8b0d-5d47e851e658"


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
