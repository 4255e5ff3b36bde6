"""The web console as the gateway serves it: the page with its security headers, every file it
loads served from the gateway and nothing from elsewhere, and the trace route (administrators
only) building the span tree of a request the page started, from the span file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from llmos.audit import ALLOW, DENY
from llmos.keys import KeyAuthenticator, parse_static_keys
from llmos.telemetry import SPAN_FILE, JsonlSpanExporter
from llmos.testing import MemoryPublisher
from services.gateway.auditing import GatewayAudit
from services.gateway.console import STATIC, add_console
from services.gateway.core import Clients, GatewayCore
from services.gateway.http import create_app
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit

KEYS = "user-key=alice:acme:user,admin-key=root:acme:admin"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def console_app(home: Path, **overrides: str) -> tuple[httpx.AsyncClient, MemoryPublisher]:
    settings = GatewaySettings(
        _env_file=None, home=home, nats_url="nats://127.0.0.1:1", ingest_addr="h:1", tokenizer_addr="h:2", inference_addr="h:3",  # type: ignore[call-arg]
        retrieval_addr="h:4", speech_addr="h:5", dialogue_addr="h:6", audit_addr="h:7", **overrides,
    )
    # The gateway's spans go to the span file under `home`, as in a running stack without a collector.
    tracing = TracerProvider(resource=Resource.create({"service.name": "gateway"}))
    tracing.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(settings.telemetry_dir / SPAN_FILE)))
    publisher = MemoryPublisher()
    audit = GatewayAudit(publisher)
    core = GatewayCore(Clients(None, None, None, None, None, None), "llmos-assistant", 5, 30, 60)  # type: ignore[arg-type]
    app = create_app(settings, core, KeyAuthenticator(parse_static_keys(KEYS)), audit, tracing)
    add_console(app, settings, audit)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway"), publisher


async def test_the_page_and_its_files_come_from_the_gateway_only(tmp_path: Path) -> None:
    http, _ = console_app(tmp_path)
    async with http:
        page = await http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        loaded = re.findall(r'(?:src|href)="(/console/[^"]+)"', page.text)
        assert {"/console/main.js", "/console/console.css"} <= set(loaded)
        for path in loaded:
            assert (await http.get(path)).status_code == 200, path
        modules = {match for file in STATIC.glob("*.js") for match in re.findall(r'from "\./([\w.]+)"', file.read_text())}
        for module in modules:
            assert (await http.get(f"/console/{module}")).status_code == 200, module
    for file in STATIC.iterdir():
        # Offline: no address of another host in any file (a link to Jaeger comes from the gateway's answer).
        assert not re.search(r"(?:https?:)?//[\w.-]+\.\w", file.read_text()), file.name


async def test_the_trace_of_a_request_the_page_started_as_a_tree(tmp_path: Path) -> None:
    http, publisher = console_app(tmp_path)
    async with http:
        assert (await http.get("/v1/me", headers={"Authorization": "Bearer user-key", "traceparent": TRACEPARENT})).status_code == 200
        spans = tmp_path / "telemetry" / SPAN_FILE
        gateway_span = next(json.loads(line) for line in spans.read_text().splitlines() if TRACE_ID in line)
        # A service's span under the gateway's, as the services write theirs into the same file.
        child = {**gateway_span, "span_id": "1" * 16, "parent_span_id": gateway_span["span_id"], "service": "dialogue",
                 "name": "llmos.v1.DialogueService/Chat", "kind": "SERVER", "start_ns": gateway_span["start_ns"] + 1_000_000,
                 "end_ns": gateway_span["start_ns"] + 3_500_000}
        with spans.open("a") as handle:
            handle.write(json.dumps(child) + "\n" + '{"trace_id": "' + TRACE_ID + '", "cut sho\n')
        answer = await http.get(f"/v1/traces/{TRACE_ID}", headers={"Authorization": "Bearer admin-key"})
        assert answer.status_code == 200, answer.text
        rows = answer.json()["spans"]
        assert [(row["depth"], row["service"], row["name"]) for row in rows] == [
            (0, "gateway", "GET /v1/me"), (1, "dialogue", "llmos.v1.DialogueService/Chat")]
        assert rows[1]["duration_ms"] == 2.5 and rows[1]["offset_ms"] == 1.0

        refused = await http.get(f"/v1/traces/{TRACE_ID}", headers={"Authorization": "Bearer user-key"})
        assert refused.status_code == 403 and "administrator" in refused.json()["error"]["message"]
        assert (await http.get(f"/v1/traces/{TRACE_ID}")).status_code == 401
        missing = await http.get(f"/v1/traces/{'0' * 32}", headers={"Authorization": "Bearer admin-key"})
        assert missing.status_code == 404 and "half a second" in missing.json()["error"]["message"]
        malformed = await http.get("/v1/traces/last", headers={"Authorization": "Bearer admin-key"})
        assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "trace_id"
    decisions = [(event.action, event.principal, event.decision) for _, event in publisher.published]  # type: ignore[attr-defined]
    assert ("GET /v1/traces/{trace_id}", "root", ALLOW) in decisions
    assert ("GET /v1/traces/{trace_id}", "alice", DENY) in decisions


async def test_with_a_collector_the_trace_is_a_link_to_jaeger(tmp_path: Path) -> None:
    http, _ = console_app(tmp_path, otlp_endpoint="http://collector:4317", gateway_jaeger_url="http://jaeger.example:16686/")
    async with http:
        answer = await http.get(f"/v1/traces/{TRACE_ID}", headers={"Authorization": "Bearer admin-key"})
    assert answer.status_code == 200
    assert answer.json()["jaeger_url"] == f"http://jaeger.example:16686/trace/{TRACE_ID}"
