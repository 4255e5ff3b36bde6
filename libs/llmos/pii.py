"""Personal data redaction: emails, phone numbers, payment card numbers and IBANs.

Shared by ingest (documents are redacted before they are chunked) and audit. A `Redactor` is
built from one tenant's policy (the kinds to redact); `redact(text)` returns the text with each
finding replaced by a placeholder such as `[EMAIL]`, and the findings with their spans in the
original text. Card numbers must pass the Luhn check and IBANs their country's length and ISO 7064 mod-97
checksum, so order numbers, other long digit runs and hexadecimal ids are left alone.

Policies come from a spec string (`LLMOS_INGEST_PII_POLICY`): comma-separated
`tenant=kind|kind` entries, `*` for every tenant not named, `none` for no redaction, e.g.
`*=email|phone|card|iban,lab=none`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

from llmos.errors import InvalidArgument


class PiiKind(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    CARD = "card"
    IBAN = "iban"


ALL_KINDS = frozenset(PiiKind)
DEFAULT_TENANT = "*"

# Every pattern must run in linear time on any input, hostile input included (audit redacts
# fields an unauthenticated caller chose). Card, IBAN and phone patterns bound every repetition,
# so each start position costs a constant. An e-mail's local part has no such bound: searching
# `(?<![\w.+-])[local]+@domain` re-scans a run of local-part characters from every position inside
# it that may start one (after "%" or "'"), quadratic on "%%%%...". So the run is matched from its
# first character only, with the domain in a lookahead so the next run may start inside it, and
# `_emails` picks where in the run the address starts.
_LOCAL_CHARS = "A-Za-z0-9._%+'-"
_EMAIL_RUN = re.compile(
    rf"(?<![{_LOCAL_CHARS}])[{_LOCAL_CHARS}]++(?=(@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{{2,}}\b))"
)
# A local part does not start right after these; inside a run, that leaves the positions after
# "%" and "'".
_LOCAL_BLOCKER = re.compile(r"[\w.+-]")
_LOCAL_RESTART = re.compile("[%']")
# 13 to 19 digits, optionally grouped by single spaces or dashes; not after "+" (a phone number).
_CARD = re.compile(r"(?<![\w+-])\d(?:[ -]?\d){12,18}(?![\w-])")
# Country code, check digits, then 11 to 30 letters or digits, optionally in groups of four;
# also the compact lower-case form some old records use (grouped lower case would run into the
# words after it), validated upper-cased.
_IBAN = re.compile(r"(?<![\w])(?:[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}|[a-z]{2}\d{2}[a-z0-9]{11,30})(?![\w])")
# An optional +country code, an optional (area code), then digit groups joined by separators
# (subscriber numbers run up to 8 digits), or the unseparated international form +4915112345678.
_PHONE = re.compile(
    r"(?<![\w+])(?:(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,8}){1,4}|\+\d{8,15})(?![\w])"
)
_DECIMAL = re.compile(r"^\d+\.\d+$")
_DIGIT_GROUPS = re.compile(r"\d+")
MIN_PHONE_DIGITS, MAX_PHONE_DIGITS = 7, 15


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment card numbers."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


# The length of an IBAN in each country that issues them (SWIFT's IBAN registry, ISO 13616). The
# checksum alone passes one string in 97 of the right shape: a platform id such as a session's
# uuid hex ("bd421c90...": Bangladesh, 32 characters) was redacted from audit records (issue 16, item 3).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29,
    "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}


def iban_valid(candidate: str) -> bool:
    """ISO 13616 IBAN: the length its country gives IBANs, and letters to numbers, first four
    characters moved to the end, mod 97 == 1."""
    compact = candidate.replace(" ", "")
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


@dataclass(frozen=True)
class Finding:
    kind: PiiKind
    start: int  # character offsets into the text given to `redact`
    end: int


@dataclass(frozen=True)
class Redaction:
    text: str
    findings: tuple[Finding, ...]


def _digits(text: str) -> str:
    return "".join(char for char in text if char.isdigit())


def _is_year(group: str) -> bool:
    return len(group) == 4 and 1900 <= int(group) <= 2099


def _is_date(groups: list[str]) -> bool:
    """yyyy-mm-dd or dd-mm-yyyy (any separator) with a plausible month and day."""
    if len(groups) != 3:
        return False
    year, month, day = (groups[0], groups[1], groups[2]) if _is_year(groups[0]) else (groups[2], groups[1], groups[0])
    return _is_year(year) and 1 <= int(month) <= 12 and 1 <= int(day) <= 31


def _not_a_phone(value: str) -> bool:
    """Digit runs shaped like phone numbers that are dates, year ranges, IPv4 addresses or decimals,
    or have a long group without the country code, area code or trunk 0 that long subscriber
    numbers come with (ids such as 2026-000123)."""
    if value.startswith("+") or "(" in value:
        return False
    groups = _DIGIT_GROUPS.findall(value)
    return (
        (not value.startswith("0") and any(len(group) > 4 for group in groups[1:]))
        or bool(_DECIMAL.match(value))
        or _is_date(groups[:3])  # a date, or an id that starts with one (lot 2026-11-29-0003)
        or (len(groups) == 2 and all(_is_year(group) for group in groups))
        or (len(groups) == 4 and "." in value and not value.strip("0123456789.") and all(int(g) <= 255 for g in groups))
    )


def _emails(text: str) -> Iterator[tuple[int, int]]:
    """Spans of e-mail addresses: the first position of each local-part run (at or after the end of
    the previous address) that may start one, to the end of the domain after the run's "@"."""
    resume = 0
    for run in _EMAIL_RUN.finditer(text):
        at = run.end()
        start = max(run.start(), resume)
        if start > 0 and _LOCAL_BLOCKER.match(text, start - 1):
            restart = _LOCAL_RESTART.search(text, start, at)
            if restart is None:
                continue
            start = restart.end()
        if start < at:
            resume = run.end(1)
            yield start, resume


# Most specific kinds first: overlapping findings go to the first kind that claims the span.
_KIND_ORDER = (PiiKind.EMAIL, PiiKind.IBAN, PiiKind.CARD, PiiKind.PHONE)


def _findings(text: str, kind: PiiKind) -> Iterator[Finding]:
    """Every validated match of one kind, in text order and not overlapping each other."""
    if kind == PiiKind.EMAIL:
        for start, end in _emails(text):
            yield Finding(kind, start, end)
    elif kind == PiiKind.IBAN:
        for match in _IBAN.finditer(text):
            if iban_valid(match.group().upper()):
                yield Finding(kind, match.start(), match.end())
    elif kind == PiiKind.CARD:
        for match in _CARD.finditer(text):
            if luhn_valid(_digits(match.group())):
                yield Finding(kind, match.start(), match.end())
    else:
        for match in _PHONE.finditer(text):
            value = match.group()
            if not _not_a_phone(value) and MIN_PHONE_DIGITS <= len(_digits(value)) <= MAX_PHONE_DIGITS:
                yield Finding(kind, match.start(), match.end())


def _claim(taken: list[Finding], candidates: Iterable[Finding]) -> list[Finding]:
    """`taken` (in text order, disjoint) with the candidates (likewise) that overlap none of it.
    One walk over both, so a text dense with findings costs linear time, not one check per pair."""
    claimed: list[Finding] = []
    index = 0
    for candidate in candidates:
        while index < len(taken) and taken[index].end <= candidate.start:
            index += 1
        if index == len(taken) or candidate.end <= taken[index].start:
            claimed.append(candidate)
    return sorted(taken + claimed, key=lambda finding: finding.start)  # merges two sorted runs


def public_key(value: str) -> str:
    """How a published contact detail is compared: case, spaces and punctuation do not matter."""
    return re.sub(r"[\s()./-]", "", value).lower()


class Redactor:
    """Redacts the kinds of personal data one policy names, except the tenant's published contact
    details (a help centre's own e-mail address and hotline are not personal data)."""

    def __init__(self, kinds: frozenset[PiiKind], public: frozenset[str] = frozenset()) -> None:
        self.kinds = kinds
        self.public = frozenset(public_key(value) for value in public)

    def find(self, text: str) -> tuple[Finding, ...]:
        """Non-overlapping findings in text order; the first kind to claim a span keeps it."""
        taken: list[Finding] = []
        for kind in _KIND_ORDER:
            if kind in self.kinds:
                taken = _claim(taken, _findings(text, kind))
        return tuple(finding for finding in taken if public_key(text[finding.start:finding.end]) not in self.public)

    def redact(self, text: str) -> Redaction:
        findings = self.find(text)
        if not findings:
            return Redaction(text, ())
        parts: list[str] = []
        cursor = 0
        for finding in findings:
            parts.append(text[cursor:finding.start])
            parts.append(f"[{finding.kind.value.upper()}]")
            cursor = finding.end
        parts.append(text[cursor:])
        return Redaction("".join(parts), findings)


class PiiPolicy:
    """Which kinds each tenant redacts; tenants not named follow the `*` entry. A tenant's
    published contact details (`public`, `tenant=value|value,…`) are kept wherever they appear."""

    def __init__(self, kinds_by_tenant: Mapping[str, frozenset[PiiKind]], public: Mapping[str, frozenset[str]] | None = None) -> None:
        self._kinds = dict(kinds_by_tenant)
        self._public = dict(public or {})
        tenants = set(self._kinds) | set(self._public)
        self._redactors = {
            tenant: Redactor(self._kinds_of(tenant), self._public.get(tenant, frozenset())) for tenant in tenants
        }
        self._none = Redactor(frozenset())

    def _kinds_of(self, tenant: str) -> frozenset[PiiKind]:
        return self._kinds.get(tenant, self._kinds.get(DEFAULT_TENANT, frozenset()))

    @classmethod
    def parse(cls, spec: str, public_spec: str = "") -> PiiPolicy:
        kinds_by_tenant: dict[str, frozenset[PiiKind]] = {}
        public: dict[str, frozenset[str]] = {}
        for entry in filter(None, (part.strip() for part in public_spec.split(","))):
            tenant, sep, values = entry.partition("=")
            kept = frozenset(value.strip() for value in values.split("|") if value.strip())
            if not sep or not tenant.strip() or not kept:
                raise InvalidArgument("pii_public", f"entry {entry!r} is not tenant=value|value")
            public[tenant.strip()] = kept
        for entry in filter(None, (part.strip() for part in spec.split(","))):
            tenant, sep, kinds = entry.partition("=")
            if not sep or not tenant.strip():
                raise InvalidArgument("pii_policy", f"entry {entry!r} is not tenant=kind|kind")
            names = [name.strip().lower() for name in kinds.split("|") if name.strip()]
            if names == ["none"]:
                kinds_by_tenant[tenant.strip()] = frozenset()
                continue
            unknown = sorted(set(names) - {kind.value for kind in PiiKind})
            if unknown or not names:
                raise InvalidArgument(
                    "pii_policy",
                    f"entry {entry!r} names unknown kinds {unknown}; use {', '.join(k.value for k in PiiKind)} or none",
                )
            kinds_by_tenant[tenant.strip()] = frozenset(PiiKind(name) for name in names)
        return cls(kinds_by_tenant, public)

    def redactor(self, tenant: str) -> Redactor:
        return self._redactors.get(tenant) or self._redactors.get(DEFAULT_TENANT) or self._none
