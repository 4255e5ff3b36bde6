"""The PII redactor: what it finds, what it leaves alone, and per-tenant policies."""

from __future__ import annotations

import pytest

from llmos.errors import InvalidArgument
from llmos.pii import ALL_KINDS, PiiKind, PiiPolicy, Redactor, iban_valid, luhn_valid

pytestmark = pytest.mark.unit

REDACT_ALL = Redactor(ALL_KINDS)


def test_luhn_and_iban_checksums() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and iban_valid("DE89370400440532013000")
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("Write to jane.doe+kb@example.co.uk today.", "Write to [EMAIL] today.", PiiKind.EMAIL),
        ("Call +44 20 7946 0958 now", "Call [PHONE] now", PiiKind.PHONE),
        ("Call (555) 123-4567.", "Call [PHONE].", PiiKind.PHONE),
        ("Card 4111 1111 1111 1111 expires", "Card [CARD] expires", PiiKind.CARD),
        ("Card 4111-1111-1111-1111.", "Card [CARD].", PiiKind.CARD),
        ("Pay to GB82 WEST 1234 5698 7654 32 please", "Pay to [IBAN] please", PiiKind.IBAN),
        ("IBAN DE89370400440532013000.", "IBAN [IBAN].", PiiKind.IBAN),
    ],
)
def test_each_kind_is_redacted_with_its_span(text: str, expected: str, kind: PiiKind) -> None:
    result = REDACT_ALL.redact(text)
    assert result.text == expected
    (finding,) = result.findings
    assert finding.kind == kind
    assert expected[: finding.start] == text[: finding.start]


@pytest.mark.parametrize(
    "text",
    [
        "Order 4111 1111 1111 1112 shipped",  # fails Luhn
        "Account GB82WEST12345698765433",  # fails mod 97
        "Released on 2024-05-17 at 10.30",  # a date and a decimal
        "Version 3.14 costs 12 euros",  # short numbers
        "not an email: user@localhost",
    ],
)
def test_look_alikes_are_left_alone(text: str) -> None:
    assert REDACT_ALL.redact(text).text == text


def test_several_findings_keep_the_text_between_them() -> None:
    text = "Mail a@b.io or call +1 415 555 2671; card 5500 0000 0000 0004."
    result = REDACT_ALL.redact(text)
    assert result.text == "Mail [EMAIL] or call [PHONE]; card [CARD]."
    assert [f.kind for f in result.findings] == [PiiKind.EMAIL, PiiKind.PHONE, PiiKind.CARD]
    assert [text[f.start:f.end] for f in result.findings] == ["a@b.io", "+1 415 555 2671", "5500 0000 0000 0004"]


def test_policy_per_tenant_with_default() -> None:
    policy = PiiPolicy.parse("*=email|card, lab=none, bank=iban|card|phone")
    text = "x@y.com 4111111111111111"
    assert policy.redactor("acme").redact(text).text == "[EMAIL] [CARD]"
    assert policy.redactor("lab").redact(text).text == text
    assert policy.redactor("bank").redact(text).text == "x@y.com [CARD]"
    assert PiiPolicy.parse("").redactor("acme").redact(text).text == text


@pytest.mark.parametrize("spec", ["email", "*=email|fax", "=email", "*="])
def test_bad_policy_specs_name_the_problem(spec: str) -> None:
    with pytest.raises(InvalidArgument, match="pii_policy"):
        PiiPolicy.parse(spec)
