"""Names the platform exports: the OpenTelemetry semantic conventions' attributes of a gRPC call,
where the collector endpoint comes from, and the Grafana dashboard querying only series the
services export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import pytest
from opentelemetry.semconv._incubating.metrics.gen_ai_metrics import (
    GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
    GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
)
from opentelemetry.semconv._incubating.metrics.messaging_metrics import (
    MESSAGING_CLIENT_OPERATION_DURATION,
    MESSAGING_PROCESS_DURATION,
)
from opentelemetry.semconv._incubating.metrics.rpc_metrics import RPC_CLIENT_CALL_DURATION, RPC_SERVER_CALL_DURATION

from llmos.grpcutil.interceptors import rpc_attributes
from llmos.settings import GATEWAY, SERVICE_NAMES, PlatformSettings
from llmos.telemetry import OTEL_OTLP_ENDPOINT_VARIABLE, otlp_endpoint

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "llmos.json"
# Durations in seconds, as Prometheus writes an OpenTelemetry histogram with unit "s".
SECONDS_SERIES = {
    name.replace(".", "_") + "_seconds"
    for name in (
        GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
        GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
        RPC_SERVER_CALL_DURATION,
        RPC_CLIENT_CALL_DURATION,
        MESSAGING_PROCESS_DURATION,
        MESSAGING_CLIENT_OPERATION_DURATION,
    )
}


def test_a_call_is_named_as_the_rpc_conventions_say() -> None:
    assert rpc_attributes("/llmos.v1.IngestService/SubmitDocument") == {
        "rpc.system.name": "grpc",
        "rpc.method": "llmos.v1.IngestService/SubmitDocument",
    }
    assert rpc_attributes("/llmos.v1.IngestService/SubmitDocument", grpc.StatusCode.OK)["rpc.response.status_code"] == "OK"
    failed = rpc_attributes("/llmos.v1.RetrievalService/Search", grpc.StatusCode.PERMISSION_DENIED)
    assert failed["rpc.response.status_code"] == failed["error.type"] == "PERMISSION_DENIED"
    assert "error.type" not in rpc_attributes("/a.B/C", grpc.StatusCode.OK)


def test_the_standard_otlp_variable_is_honoured_and_ours_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OTEL_OTLP_ENDPOINT_VARIABLE, raising=False)
    assert otlp_endpoint("") == ""
    monkeypatch.setenv(OTEL_OTLP_ENDPOINT_VARIABLE, "http://collector:4317")
    assert otlp_endpoint("") == "http://collector:4317"
    assert otlp_endpoint("http://ours:4317") == "http://ours:4317"


def test_each_process_has_a_metrics_port_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SERVICE_NAMES:
        monkeypatch.setenv(f"LLMOS_{name.upper()}_ADDR", "127.0.0.1:1")
    monkeypatch.setenv("LLMOS_NATS_URL", "nats://127.0.0.1:1")
    monkeypatch.setenv("LLMOS_BIND_HOST", "0.0.0.0")
    monkeypatch.setenv("LLMOS_INFERENCE_METRICS_ADDR", "inference:9463")
    monkeypatch.setenv("LLMOS_GATEWAY_METRICS_ADDR", "gateway:9468")
    settings = PlatformSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.metrics_listen_addr("inference") == "0.0.0.0:9463"
    assert settings.metrics_listen_addr(GATEWAY) == "0.0.0.0:9468"
    assert settings.metrics_listen_addr("ingest") == ""  # not set: not served
    monkeypatch.setenv("LLMOS_AUDIT_METRICS_ADDR", "no-port")
    with pytest.raises(ValueError, match="HOST:PORT"):
        PlatformSettings(_env_file=None)  # type: ignore[call-arg]


def exported_llmos_series() -> set[str]:
    """The platform's own instruments, by the name Prometheus gives them."""
    names = set()
    for source in (ROOT / "services").rglob("*.py"):
        for dotted, unit in re.findall(r'create_\w+\(\s*"(llmos\.[a-z_.]+)",\s*(?:unit="([^"]*)")?', source.read_text()):
            suffix = {"ms": "_milliseconds", "s": "_seconds"}.get(unit, "")
            names.add(dotted.replace(".", "_") + suffix)
    return names


def test_the_dashboard_queries_only_series_the_services_export() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = SECONDS_SERIES | exported_llmos_series()
    assert "llmos_inference_requests_running" in exported  # the source scan finds the instruments
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert {panel["title"] for panel in panels} >= {"Time to first token", "Time per output token", "Documents submitted"}
    queried = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Every series is read by rate(…) or summed directly: the name follows the parenthesis.
            metrics = set(re.findall(r"\b(?:rate|sum)\(([a-z_]+)\b(?!\()", target["expr"]))
            assert metrics, (panel["title"], target["expr"])
            for metric in metrics:
                series = re.sub(r"_(bucket|count|sum|total)$", "", metric)
                assert series in exported, (panel["title"], metric)
            queried |= metrics
    assert {f"{name}_bucket" for name in SECONDS_SERIES if name.startswith(("gen_ai", "rpc_server"))} <= queried
