"""One client call crossing services over gRPC and NATS makes one trace with the expected edges."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider

from llmos.clients import IngestClient
from llmos.grpcutil.interceptors import outgoing_metadata
from llmos.telemetry import SPAN_FILE, read_spans
from llmos.v1 import ingest_pb2
from tests.conftest import TEST_API_KEY, RunningStack
from tests.grpc_helpers import connected

pytestmark = pytest.mark.integration


async def test_submit_document_is_one_trace_across_ingest_tokenizer_and_audit(stack: RunningStack) -> None:
    tracer = TracerProvider().get_tracer("test-client")
    with tracer.start_as_current_span("client") as client_span:
        trace_id = format(client_span.get_span_context().trace_id, "032x")
        # The client span's context travels in the call's metadata, as a service's interceptor sends it.
        async with connected(stack, IngestClient, tuple(outgoing_metadata(f"Bearer {TEST_API_KEY}"))) as ingest:
            await ingest.submit(ingest_pb2.SubmitDocumentRequest(document_id="traced", content=b"Follow this document."))

    span_file = stack.home / "telemetry" / SPAN_FILE
    services_seen: set[str] = set()
    for _ in range(100):  # span processors flush every 0.5 s
        spans = [span for span in read_spans(span_file) if span["trace_id"] == trace_id]
        services_seen = {span["service"] for span in spans}
        if {"ingest", "tokenizer", "audit"} <= services_seen:
            break
        await asyncio.sleep(0.1)
    assert {"ingest", "tokenizer", "audit"} <= services_seen, services_seen

    by_id = {span["span_id"]: span for span in spans}
    ingest_span = next(span for span in spans if span["name"] == "llmos.v1.IngestService/SubmitDocument")
    # The tokenizer's SERVER span; ingest's CLIENT span of the same call has the same name.
    tokenizer_span = next(
        span for span in spans if span["name"] == "llmos.v1.TokenizerService/Tokenize" and span["service"] == "tokenizer"
    )
    audit_span = next(span for span in spans if span["service"] == "audit")
    assert ingest_span["parent_span_id"] == format(client_span.get_span_context().span_id, "016x")
    assert by_id[tokenizer_span["parent_span_id"]]["service"] == "ingest"  # gRPC edge ingest → tokenizer
    assert by_id[audit_span["parent_span_id"]]["service"] == "ingest"  # NATS edge ingest → audit
    assert audit_span["kind"] == "CONSUMER" and tokenizer_span["kind"] == "SERVER"
