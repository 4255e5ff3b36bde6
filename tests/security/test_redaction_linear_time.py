"""Redaction runs in linear time on any input (issue 13, item 1): a denied call's fields, audit
records and ingested documents all pass the redactor, so a pattern that backtracks on a run of
special characters is a way to burn the service's CPU without a key."""

from __future__ import annotations

import random
import re

import pytest

from llmos.pii import ALL_KINDS, PiiKind, Redactor
from tests.timing_helpers import cpu_seconds, cpu_seconds_within

pytestmark = pytest.mark.security

REDACT_ALL = Redactor(ALL_KINDS)

MEGABYTE = 1_000_000
# One megabyte of each character the patterns care about, alone and in the mixes that give a
# backtracking pattern the most places to start from; the last rows are dense with real findings.
HOSTILE_UNITS = [
    "%", ".", "+", "-", "'", "_", "@", "1", "a", "A", " ",
    "1 ", "1-", "1.", "+1 ", "(1)", "a.", "a%", "a'", "a-", "a+", "%a", "'a", "a@", "@a", "a@a.", "a.1", "é%a",
    "GB82", "ab12", "x@y.co ", "4111 1111 1111 1111 ", "+44 20 7946 0958 ", "GB82 WEST 1234 5698 7654 32 ",
]
# A linear redactor runs four patterns and handles each finding in Python: well under this many
# times the cost of one plain regex pass over the same text. A quadratic one needs hours for 1 MB.
RATIO_TO_SCAN = 50


@pytest.mark.parametrize("unit", HOSTILE_UNITS)
def test_a_megabyte_of_hostile_input_redacts_in_linear_time(unit: str) -> None:
    text = (unit * (MEGABYTE // len(unit) + 1))[:MEGABYTE]
    scan = cpu_seconds(lambda: len(re.findall(r"\w", text)))
    limit = RATIO_TO_SCAN * max(scan, 0.01)
    took = cpu_seconds_within(lambda: REDACT_ALL.redact(text), limit)
    print(f"\n{unit!r}: scan {scan:.3f} s, redact {took:.3f} s ({took / max(scan, 0.01):.1f}x)")


# The e-mail pattern before it was made linear: the reference for what must still be found.
QUADRATIC_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")


def reference_find(text: str) -> list[tuple[PiiKind, int, int]]:
    """Findings as the redactor made them before: the quadratic e-mail pattern, then each kind's
    matches checked against every finding already taken."""
    candidates = [(PiiKind.EMAIL, match.start(), match.end()) for match in QUADRATIC_EMAIL.finditer(text)]
    for kind in (PiiKind.IBAN, PiiKind.CARD, PiiKind.PHONE):
        candidates += [(f.kind, f.start, f.end) for f in Redactor(frozenset({kind})).find(text)]
    taken: list[tuple[PiiKind, int, int]] = []
    for kind, start, end in candidates:
        if all(end <= other_start or start >= other_end for _, other_start, other_end in taken):
            taken.append((kind, start, end))
    return sorted(taken, key=lambda finding: finding[1])


@pytest.mark.parametrize(
    "text",
    [
        "a@b.com%x@y.com",  # the next address starts inside the run the last one's domain began
        "a@b.com.x@y.com",  # ... or may not: "x" follows "."
        "a@b.com'x%y@z.org and a@b.com@c.com",
        "é%jane@x.com é'a%b@x.com é.x@y.com",  # no start right after a word character
        "%%'jane.doe@ex-ample.co.uk 4111 1111 1111 1111 GB82 WEST 1234 5698 7654 32 +44 20 7946 0958",
    ],
)
def test_same_findings_as_the_quadratic_pattern(text: str) -> None:
    assert [(f.kind, f.start, f.end) for f in REDACT_ALL.find(text)] == reference_find(text)


def test_same_findings_as_the_quadratic_pattern_on_random_text() -> None:
    rng = random.Random(13)
    alphabet = "aZ19_.%+'-@ é(" + "@.%'a1 " * 3
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert [(f.kind, f.start, f.end) for f in REDACT_ALL.find(text)] == reference_find(text), text
