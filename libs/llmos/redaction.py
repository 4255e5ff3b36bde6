"""Personal data kept out of logs, span attributes and audit records.

Everything the platform writes about itself passes one redactor with every PII kind on
(`llmos.pii`), whatever a tenant's ingestion policy: logs and traces are read by operators, not
by the data's owners.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Status

from llmos.pii import ALL_KINDS, Redactor

_REDACTOR = Redactor(ALL_KINDS)
_FORMATTER = logging.Formatter()


def redact(text: str) -> str:
    return _REDACTOR.redact(text).text if text else text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_redact_value(item) for item in value)
    return value


def _redact_attributes(attributes: Any) -> dict[str, Any]:
    return {key: _redact_value(value) for key, value in (attributes or {}).items()}


class RedactingLogFilter(logging.Filter):
    """Rewrites each record's message with personal data replaced by placeholders."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        # A traceback quotes exception messages (and local values): formatters print the cached
        # exc_text when there is one, so format it here, redacted.
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def redacted_span(span: ReadableSpan) -> ReadableSpan:
    return ReadableSpan(
        name=span.name,
        context=span.get_span_context(),
        parent=span.parent,
        resource=span.resource,
        attributes=_redact_attributes(span.attributes),
        events=[Event(event.name, _redact_attributes(event.attributes), event.timestamp) for event in span.events],
        links=span.links,
        kind=span.kind,
        status=Status(span.status.status_code, redact(span.status.description)) if span.status.description else span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class RedactingSpanExporter(SpanExporter):
    """Wraps an exporter so that no span attribute, event or status message leaves with personal data in it."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._inner.export([redacted_span(span) for span in spans])

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)
