"""Chunk ids are unambiguous across tenants (issue 13, item 7): tenant `acme` with document
`eu/faq` and tenant `acme/eu` with document `faq` had the same id, so one tenant's chunk could
overwrite another's in the shared index. Tenant names are also refused with separators
(test_tenant_names.py); the ids stay distinct whatever the names hold."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.ingest.core import chunk_id

pytestmark = pytest.mark.security

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
