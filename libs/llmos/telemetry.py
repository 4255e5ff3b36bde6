"""Tracing, metrics and logging set-up, and W3C trace-context propagation.

Spans go to an OTLP collector when `LLMOS_OTLP_ENDPOINT` (else the standard
`OTEL_EXPORTER_OTLP_ENDPOINT`) is set, else one JSON object per line to
`$LLMOS_HOME/telemetry/spans.jsonl`, which `llmos trace` reads. Every process of the stack
appends to the same file, one `write` per span so lines never interleave. Both files are 0600,
and spans (attributes, events, status messages) and log lines (tracebacks included) pass the
PII redactor first. Metrics also go to Prometheus: a process with `LLMOS_<SERVICE>_METRICS_ADDR`
set serves them as Prometheus text on that port (`GET /metrics`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from llmos.redaction import RedactingLogFilter, RedactingSpanExporter
from llmos.settings import PlatformSettings

logger = logging.getLogger(__name__)

SPAN_FILE = "spans.jsonl"
METRICS_FILE = "metrics.jsonl"
_METRICS_INTERVAL_MS = 10_000
# The variable every OpenTelemetry SDK reads; LLMOS_OTLP_ENDPOINT wins when both are set.
OTEL_OTLP_ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"
# Histogram buckets in seconds, as the semantic conventions advise for each kind of duration (the
# SDK's default buckets are meant for milliseconds and would put every call in the first two).
CALL_DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TIME_TO_FIRST_TOKEN_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)
TIME_PER_OUTPUT_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


def seconds_histogram(
    meter: metrics.Meter, name: str, description: str, buckets: Sequence[float] = CALL_DURATION_BUCKETS_S
) -> metrics.Histogram:
    """A histogram of durations in seconds, with the buckets advised for that kind of duration."""
    return meter.create_histogram(name, unit="s", description=description, explicit_bucket_boundaries_advisory=buckets)


def otlp_endpoint(configured: str) -> str:
    """The collector to export to: LLMOS_OTLP_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT, else none."""
    return configured or os.environ.get(OTEL_OTLP_ENDPOINT_VARIABLE, "")


def span_to_record(span: ReadableSpan) -> dict[str, Any]:
    """A span as the flat JSON record stored in the span file."""
    context = span.get_span_context()
    parent = span.parent
    return {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent else None,
        "name": span.name,
        "service": span.resource.attributes.get("service.name", "unknown"),
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "status_message": span.status.description,
        "attributes": {key: _jsonable(value) for key, value in (span.attributes or {}).items()},
        "events": [
            {"name": event.name, "time_ns": event.timestamp, "attributes": dict(event.attributes or {})}
            for event in span.events
        ],
    }


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class JsonlSpanExporter(SpanExporter):
    """Appends finished spans to a JSON-lines file shared by every local process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_to_record(span)) + "\n" for span in spans)
        with self._lock:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, lines.encode("utf-8"))
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: the file is opened per export."""


def read_spans(path: Path) -> list[dict[str, Any]]:
    """Every span record in a span file, skipping a line cut short by a crash."""
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _span_exporter(otlp_endpoint: str, telemetry_dir: Path) -> SpanExporter:
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)
    return JsonlSpanExporter(telemetry_dir / SPAN_FILE)


def _metric_exporter(otlp_endpoint: str, telemetry_dir: Path) -> MetricExporter:
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(endpoint=otlp_endpoint, insecure=True)
    telemetry_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(telemetry_dir / METRICS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    stream = os.fdopen(fd, "a", encoding="utf-8")
    return ConsoleMetricExporter(
        out=stream, formatter=lambda data: data.to_json(indent=None) + "\n"
    )


def _serve_prometheus(service: str, listen: str) -> tuple[MetricReader, Any] | None:
    """A reader whose metrics are served as Prometheus text on `listen` (HOST:PORT), and its
    HTTP server; None when the port cannot be had: metrics only observe, so a taken port (say,
    a private stack beside `llmos up` reading the same .env) is logged and the service serves on."""
    from prometheus_client import start_http_server

    host, _, port = listen.rpartition(":")
    try:
        server, _thread = start_http_server(int(port), host)
    except OSError as exc:
        logger.error("%s: cannot serve Prometheus metrics on %s (%s); serving without them", service, listen, exc)
        return None
    logger.info("%s: Prometheus metrics on http://%s/metrics", service, listen)
    # The reader registers with prometheus_client's registry, which the server above serves.
    return PrometheusMetricReader(), server


class Telemetry:
    """The tracer and meter providers of one process; `shutdown` flushes both."""

    def __init__(self, service: str, settings: PlatformSettings) -> None:
        endpoint = otlp_endpoint(settings.otlp_endpoint)
        resource = Resource.create({"service.name": service, "service.namespace": "llmos"})
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(
            BatchSpanProcessor(
                RedactingSpanExporter(_span_exporter(endpoint, settings.telemetry_dir)), schedule_delay_millis=500
            )
        )
        readers: list[MetricReader] = [
            PeriodicExportingMetricReader(
                _metric_exporter(endpoint, settings.telemetry_dir), export_interval_millis=_METRICS_INTERVAL_MS
            )
        ]
        self._prometheus_server: Any = None
        metrics_listen = settings.metrics_listen_addr(service)
        served = _serve_prometheus(service, metrics_listen) if metrics_listen else None
        if served is not None:
            reader, self._prometheus_server = served
            readers.append(reader)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        trace.set_tracer_provider(self.tracer_provider)
        metrics.set_meter_provider(self.meter_provider)
        self.service = service

    def shutdown(self) -> None:
        self.tracer_provider.force_flush()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self._prometheus_server is not None:
            self._prometheus_server.shutdown()


def setup_telemetry(service: str, settings: PlatformSettings) -> Telemetry:
    """Traces, metrics and their exporters for the process of `service`, as `settings` configure."""
    return Telemetry(service, settings)


def setup_logging(service: str, level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingLogFilter())


def inject_context(carrier: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Write the current trace context (W3C `traceparent`) into headers or metadata."""
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str]) -> Context:
    """The trace context carried by incoming headers or metadata."""
    return propagate.extract(carrier)


def current_trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""
