from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmos.audit import ALLOW, audit_event
from llmos.crypto import new_key_entry
from llmos.redaction import RedactingLogFilter, RedactingSpanExporter
from llmos.v1 import events_pb2
from services.audit.chain import ChainKeys
from services.audit.core import AuditStore

pytestmark = pytest.mark.unit

PII = "mail jane.doe@example.com or call +44 20 7946 0958, card 4111 1111 1111 1111"


def test_log_messages_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("redaction-test")
    caplog.handler.addFilter(RedactingLogFilter())
    with caplog.at_level(logging.INFO):
        logger.info("customer wrote: %s (order NW-204518)", PII)
    text = caplog.records[-1].getMessage()
    assert "jane.doe@example.com" not in text and "4111" not in text and "7946" not in text
    assert "NW-204518" in text


def test_span_attributes_and_events_are_redacted_on_export() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RedactingSpanExporter(memory)))
    with provider.get_tracer("t").start_as_current_span("op") as span:
        span.set_attribute("llmos.query", PII)
        span.set_attribute("llmos.count", 3)
        span.add_event("note", {"text": "from jane.doe@example.com"})
    (exported,) = memory.get_finished_spans()
    assert "jane.doe" not in exported.attributes["llmos.query"] and exported.attributes["llmos.count"] == 3
    assert "jane.doe" not in exported.events[0].attributes["text"]
    assert exported.get_span_context() == span.get_span_context()


def test_audit_records_are_redacted_at_the_source_and_the_store(tmp_path: Path) -> None:
    event = audit_event("ingest", "alice", "acme", "ingest/submit", "document/jane.doe@example.com", ALLOW, PII)
    assert "jane.doe" not in event.resource + event.reason
    forged = events_pb2.AuditEvent(event_id=uuid.uuid4().hex, tenant="acme", reason=PII)
    store = AuditStore(tmp_path / "a.sqlite3", ChainKeys.from_spec(new_key_entry()), tmp_path / "checkpoint.json")
    stored = store.append(forged, "ingest")
    assert "jane.doe" not in stored.event.reason and "4111" not in stored.event.reason
