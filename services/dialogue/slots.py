"""Slots: values a flow needs before it can act, asked for, validated and kept in the session."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ORDER_NUMBER = "order_number"
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


@dataclass(frozen=True)
class Order:
    number: str
    tenant: str
    status: str
    detail: str
    items: str


class OrderBook:
    """Orders by tenant and number, read from a YAML file (the demo's stand-in for an order system)."""

    def __init__(self, orders: list[Order]) -> None:
        self._orders = {(order.tenant, order.number): order for order in orders}

    @classmethod
    def from_file(cls, path: Path) -> OrderBook:
        if not path.exists():
            return cls([])
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return cls([Order(**{key: str(value) for key, value in entry.items()}) for entry in document.get("orders", [])])

    def find(self, tenant: str, number: str) -> Order | None:
        return self._orders.get((tenant, number))
