"""The web console: its page at `GET /`, its scripts and styles under `/console/` (plain files,
nothing fetched from elsewhere, so it works offline), and the trace of one request for
administrators (`GET /v1/traces/{trace_id}`).

The console starts a trace for each request it makes (a W3C `traceparent` header it generates),
so the gateway's server span and every span under it share a trace id the page knows; the trace
view asks for that id. Spans are read from the local span file, which holds the requests of every
tenant (hence administrators only, like `llmos trace` on the host); when they go to an OTLP
collector instead, the answer is a link to the trace in Jaeger.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from opentelemetry import trace

from llmos import errors
from llmos.audit import ALLOW, DENY
from llmos.auth import current_principal
from llmos.telemetry import SPAN_FILE
from llmos.tracetree import SpanRecord, trace_spans, tree_rows
from services.gateway.http import AuditRecorder
from services.gateway.settings import GatewaySettings

STATIC = Path(__file__).with_name("static")
# The page loads only its own files and talks only to this gateway; the recorded answer plays
# from a blob: URL. No inline script or style, so injected markup could not run either.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
TRACE_ID = re.compile(r"[0-9a-f]{32}")
TRACE_ACTION = "GET /v1/traces/{trace_id}"


def spans_of(path: Path, trace_id: str) -> list[SpanRecord]:
    """The trace's records in the span file; only lines naming the id are parsed, as the file
    holds every request since the platform first ran."""
    if not path.exists():
        return []
    spans = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if trace_id in line:
                try:
                    spans.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
    return trace_spans(spans, trace_id)


def add_console(app: FastAPI, settings: GatewaySettings, audit: AuditRecorder) -> None:
    app.mount("/console", StaticFiles(directory=STATIC), name="console")

    @app.get("/", include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                     "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"},
        )

    @app.get("/v1/traces/{trace_id}", tags=["platform"])
    async def trace_of(trace_id: str) -> dict[str, Any]:
        """The span tree of one trace (administrators): service, span name, duration and start
        offset of each span, children under parents."""
        principal = current_principal()
        trace.get_current_span().update_name(TRACE_ACTION)
        resource = f"trace/{trace_id}"
        if not principal.is_admin:
            roles = ", ".join(sorted(principal.roles)) or "none"
            denied = errors.PermissionDenied(
                f"{principal.subject!r} (roles: {roles}) may not read traces: the span file holds every tenant's requests; ask an administrator"
            )
            await audit.record(principal, TRACE_ACTION, resource, DENY, denied.message)
            raise denied
        if not TRACE_ID.fullmatch(trace_id):
            raise errors.InvalidArgument("trace_id", "a trace id is 32 lower-case hexadecimal digits (W3C trace context)")
        await audit.record(principal, TRACE_ACTION, resource, ALLOW, "")
        if settings.otlp_endpoint:
            return {"object": "trace", "trace_id": trace_id, "jaeger_url": f"{settings.gateway_jaeger_url.rstrip('/')}/trace/{trace_id}",
                    "spans": []}
        path = settings.telemetry_dir / SPAN_FILE
        spans = await asyncio.to_thread(spans_of, path, trace_id)
        if not spans:
            raise errors.NotFound(f"no spans of trace {trace_id} in {path} yet: each process writes its spans about half a second after they end")
        rows = [
            {"depth": row.depth, "service": row.span["service"], "name": row.span["name"], "kind": row.span["kind"],
             "duration_ms": round(row.duration_ms, 3), "offset_ms": round(row.offset_ms, 3), "status": row.span["status"],
             "status_message": row.span.get("status_message") or None}
            for row in tree_rows(spans)
        ]
        return {"object": "trace", "trace_id": trace_id, "jaeger_url": None, "spans": rows}
