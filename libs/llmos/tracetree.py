"""Render one trace from the local span file as a tree, service by service (`llmos trace`, and
the web console's trace view through the gateway)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SpanRecord = dict[str, Any]


@dataclass(frozen=True)
class TreeRow:
    """One span in tree order: its depth under the trace's roots and its timing."""

    depth: int
    span: SpanRecord
    duration_ms: float
    offset_ms: float  # since the trace's first span started


def last_trace_id(spans: list[SpanRecord]) -> str | None:
    """The trace whose root span started last."""
    roots = [span for span in spans if span["parent_span_id"] is None]
    candidates = roots or spans
    return max(candidates, key=lambda span: span["start_ns"])["trace_id"] if candidates else None


def trace_spans(spans: Iterable[SpanRecord], trace_id: str) -> list[SpanRecord]:
    return [span for span in spans if span["trace_id"] == trace_id]


def tree_rows(spans: list[SpanRecord]) -> list[TreeRow]:
    """The spans depth first, children under parents by start time; a span whose parent is not
    among them (a caller outside the platform, a browser) is a root."""
    by_id = {span["span_id"]: span for span in spans}
    children: dict[str | None, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        parent = span["parent_span_id"] if span["parent_span_id"] in by_id else None
        children[parent].append(span)
    for siblings in children.values():
        siblings.sort(key=lambda span: span["start_ns"])
    origin = min((span["start_ns"] for span in spans), default=0)
    rows: list[TreeRow] = []

    def visit(span: SpanRecord, depth: int) -> None:
        rows.append(TreeRow(depth, span, (span["end_ns"] - span["start_ns"]) / 1e6, (span["start_ns"] - origin) / 1e6))
        for child in children.get(span["span_id"], []):
            visit(child, depth + 1)

    for root in children.get(None, []):
        visit(root, 0)
    return rows


def render_tree(spans: list[SpanRecord]) -> list[str]:
    """Lines of an indented tree: `service  span name  duration`, children under parents."""
    lines = []
    for row in tree_rows(spans):
        span = row.span
        status = "" if span["status"] != "ERROR" else f"  ERROR {span.get('status_message') or ''}".rstrip()
        lines.append(f"{'  ' * row.depth}{span['service']:<10} {span['name']}  {row.duration_ms:.1f} ms (+{row.offset_ms:.1f}){status}")
    return lines
