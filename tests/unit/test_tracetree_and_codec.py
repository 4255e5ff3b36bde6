from __future__ import annotations

import pytest

from llmos.bus.codec import decode, encode
from llmos.errors import InvalidArgument
from llmos.tracetree import last_trace_id, render_tree, trace_spans
from llmos.v1 import events_pb2

pytestmark = pytest.mark.unit


def span(span_id: str, parent: str | None, service: str, start: int, end: int, trace: str = "t1") -> dict:
    return {"trace_id": trace, "span_id": span_id, "parent_span_id": parent, "name": f"{service} op",
            "service": service, "start_ns": start, "end_ns": end, "status": "UNSET"}


def test_tree_nests_children_under_parents_in_start_order() -> None:
    spans = [span("c", "a", "tokenizer", 3_000_000, 4_000_000), span("a", None, "ingest", 0, 10_000_000),
             span("b", "a", "audit", 5_000_000, 6_000_000)]
    lines = render_tree(spans)
    assert lines[0].startswith("ingest") and "10.0 ms" in lines[0]
    assert lines[1].startswith("  tokenizer") and "(+3.0)" in lines[1]
    assert lines[2].startswith("  audit")


def test_last_trace_is_the_latest_root() -> None:
    spans = [span("a", None, "ingest", 0, 1, trace="old"), span("b", None, "ingest", 5, 6, trace="new"),
             span("c", "b", "audit", 7, 8, trace="new")]
    assert last_trace_id(spans) == "new"
    assert len(trace_spans(spans, "new")) == 2


def test_codec_round_trip_and_garbage() -> None:
    message = events_pb2.DocumentDeleted(document_id="d1", tenant="acme")
    assert decode(events_pb2.DocumentDeleted, encode(message)) == message
    with pytest.raises(InvalidArgument, match="not a valid llmos.v1.DocumentDeleted"):
        decode(events_pb2.DocumentDeleted, b"\xff\xff\xff")
