"""Slots: values a flow needs before it can act, asked for, validated and kept in the session."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ORDER_NUMBER = "order_number"
# Proof that the customer placed the order: its e-mail address or delivery postcode. Never kept
# in the session; the slot name only marks that the assistant asked for it.
ORDER_PROOF = "order_proof"
# NW- and six digits; customers also type "nw 204518", "NW204518" or just the six digits.
_ORDER_PATTERN = re.compile(r"\bnw[\s-]?(\d{6})\b", re.IGNORECASE)
_BARE_DIGITS = re.compile(r"(?<![\d-])(\d{6})(?!\d)")
_ALMOST = re.compile(r"\bnw[\s-]?\d{1,12}\b", re.IGNORECASE)


@dataclass(frozen=True)
class SlotValue:
    value: str | None  # normalized (NW-######) when valid
    problem: str = ""  # why what the user typed is not a valid value


def extract_order_number(message: str, expecting: bool) -> SlotValue:
    """An order number in `message`; bare six digits count only when the assistant asked for one."""
    match = _ORDER_PATTERN.search(message)
    if match:
        return SlotValue(f"NW-{match.group(1)}")
    if expecting:
        bare = _BARE_DIGITS.search(message)
        if bare:
            return SlotValue(f"NW-{bare.group(1)}")
    almost = _ALMOST.search(message)
    if almost:
        return SlotValue(None, f"{almost.group(0)!r} is not an order number: they are NW- followed by six digits, e.g. NW-204518")
    return SlotValue(None)


# Anchored at the start of a run of address characters, so a long run without '@' is scanned once.
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}")
# Postcodes as customers type them: 4 or 5 digits (DE, AT, CH, US ...), UK (SW1A 1AA), NL (1011 AB).
_POSTCODE = re.compile(
    r"(?<![\w-])(?:[a-z]{1,2}\d[a-z\d]?\s?\d[a-z]{2}|\d{4}\s?[a-z]{2}|\d{4,5})(?![\w-])", re.IGNORECASE
)


# A message listing many postcodes must not try them all at once.
MAX_PROOFS_PER_MESSAGE = 3


def extract_order_proofs(message: str) -> list[str]:
    """The first e-mail addresses and postcode-like words in `message`, normalized for comparison."""
    found = [*(m.group(0) for m in _EMAIL.finditer(message)), *(m.group(0) for m in _POSTCODE.finditer(message))]
    return [_normal(value) for value in found[:MAX_PROOFS_PER_MESSAGE]]


def _normal(value: str) -> str:
    return "".join(value.split()).casefold()


@dataclass(frozen=True)
class Order:
    number: str
    tenant: str
    status: str
    detail: str
    items: str
    email: str  # the customer's; with the postcode, what proves a look-up is theirs
    postcode: str


class OrderBook:
    """Orders by tenant and number, read from a YAML file (the demo's stand-in for an order system).

    Order numbers are short and guessable, so an order is opened only with its e-mail address or
    postcode, and a wrong one looks exactly like a number that does not exist (`open` returns
    None for both): walking the numbers tells nothing about which orders are real.
    """

    def __init__(self, orders: list[Order]) -> None:
        self._orders = {(order.tenant, order.number): order for order in orders}

    @classmethod
    def from_file(cls, path: Path) -> OrderBook:
        if not path.exists():
            return cls([])
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return cls([Order(**{key: str(value) for key, value in entry.items()}) for entry in document.get("orders", [])])

    def open(self, tenant: str, number: str, proofs: list[str]) -> Order | None:
        """The order, when one of `proofs` (from extract_order_proofs) is its e-mail or postcode."""
        order = self._orders.get((tenant, number))
        if order is None or not {_normal(order.email), _normal(order.postcode)} & set(proofs):
            return None
        return order

    def reopen(self, tenant: str, number: str) -> Order | None:
        """An order this conversation already opened with its proof (the session remembers which)."""
        return self._orders.get((tenant, number))
