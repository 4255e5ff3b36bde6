"""The platform's own ids are not personal data: a session id (uuid4 hex) passed the IBAN
checksum about once in two thousand and was redacted from its audit record, so the record no
longer said which session a turn belonged to (issue 16, item 3: the rolling restart's audit check
found two such turns in 2,171)."""

from __future__ import annotations

import uuid

import pytest

from llmos.audit import bounded_redacted
from llmos.pii import iban_valid

pytestmark = pytest.mark.unit

# Session ids the audit trail lost ("session/[IBAN]") in a rolling-restart run.
REDACTED_SESSION_IDS = ("bd421c909baa464aa79d18d7de1a41a3", "ae3255411559442e9f098f6a833b97fa")


@pytest.mark.parametrize("session_id", REDACTED_SESSION_IDS)
def test_a_session_id_that_passes_the_iban_checksum_stays_in_its_audit_resource(session_id: str) -> None:
    assert bounded_redacted(f"session/{session_id}") == f"session/{session_id}"


def test_no_uuid_hex_id_is_taken_for_an_iban() -> None:
    ids = [uuid.UUID(int=number * 0x9E3779B97F4A7C15F39CC0605CEDC835 % 2**128).hex for number in range(20_000)]
    assert [value for value in ids if iban_valid(value.upper())] == []


def test_an_iban_of_the_wrong_length_for_its_country_is_not_one() -> None:
    # Each passes the checksum (mod 97 == 1), but Germany's IBANs have 22 characters and Bangladesh issues none.
    assert iban_valid("DE89370400440532013000")
    assert not iban_valid("DE1337040044053201300075")
    assert not iban_valid("BD421C909BAA464AA79D18D7DE1A41A3")
