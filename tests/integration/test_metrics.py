"""Each service's Prometheus text after a real chat turn: it parses, and holds the series the
OpenTelemetry semantic conventions name, in seconds, with their attributes; the turn's trace
has CLIENT spans for outgoing gRPC calls and PRODUCER spans for publishes."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from llmos.clients import DialogueClient, InferenceClient, IngestClient
from llmos.settings import SERVICE_NAMES
from llmos.telemetry import SPAN_FILE, read_spans
from llmos.v1 import common_pb2, dialogue_pb2, ingest_pb2
from tests.conftest import RunningStack
from tests.grpc_helpers import connected

pytestmark = pytest.mark.integration

ARTICLE = Path(__file__).resolve().parents[2] / "demo" / "kb" / "giftcards.md"
# The conventions' names as Prometheus writes them: dots become underscores, the unit a suffix.
TIME_TO_FIRST_TOKEN = "gen_ai_server_time_to_first_token_seconds"
TIME_PER_OUTPUT_TOKEN = "gen_ai_server_time_per_output_token_seconds"
SERVER_DURATION = "rpc_server_call_duration_seconds"
CLIENT_DURATION = "rpc_client_call_duration_seconds"
PROCESS_DURATION = "messaging_process_duration_seconds"


def scrape(stack: RunningStack, service: str) -> dict[str, Metric]:
    addr = stack.env[f"LLMOS_{service.upper()}_METRICS_ADDR"]
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    return {family.name: family for family in text_string_to_metric_families(text)}


def counts(family: Metric) -> list[tuple[dict[str, str], float, float]]:
    """(labels, count, sum) of each series of a histogram family."""
    sums = {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name.endswith("_sum")}
    return [
        (sample.labels, sample.value, sums[tuple(sorted(sample.labels.items()))])
        for sample in family.samples if sample.name.endswith("_count")
    ]


def methods(series: Iterable[tuple[dict[str, str], float, float]]) -> set[str]:
    return {labels["rpc_method"] for labels, _, _ in series}


async def chat_turn(stack: RunningStack) -> list[dialogue_pb2.ChatResponse]:
    """Index the gift-card article and ask the assistant about it (dialogue embeds the question
    and searches; the test stack's dialogue answers from the evidence, without a draft), and have
    the served model answer a chat (what a chat completion makes of it: InferenceService.Generate)."""
    async with connected(stack, IngestClient) as ingest:
        await ingest.submit(
            ingest_pb2.SubmitDocumentRequest(
                document_id="giftcards", title="Gift cards", mime_type="text/markdown", content=ARTICLE.read_bytes()
            )
        )
        statuses = await ingest.wait_until_settled(["giftcards"], within_s=60, poll_s=0.1)
    assert statuses["giftcards"].stage == common_pb2.DOCUMENT_STAGE_INDEXED
    async with connected(stack, DialogueClient) as dialogue:
        request = dialogue_pb2.ChatRequest(message="How long is a gift card valid?")
        responses = [response async for response in dialogue.chat(request, 120)]
    async with connected(stack, InferenceClient) as inference:
        answer = "".join([delta async for delta in inference.generate_stream([("user", "Name a colour.")], 16, 120)])
    assert answer
    return responses


@pytest.mark.timeout(600)
async def test_prometheus_text_parses_and_names_the_conventions_series_after_a_turn(stack: RunningStack) -> None:
    responses = await chat_turn(stack)
    assert responses[-1].final and not responses[-1].handoff
    scraped = {service: scrape(stack, service) for service in SERVICE_NAMES}

    for service, families in scraped.items():
        info = families["target_info"]  # the resource, once per process
        assert info.samples[0].labels["service_name"] == service, service

    # Inference: the GenAI server metrics, per successful response, in seconds.
    inference = scraped["inference"]
    for name in (TIME_TO_FIRST_TOKEN, TIME_PER_OUTPUT_TOKEN):
        assert inference[name].type == "histogram", name
        series = counts(inference[name])
        assert series, f"{name}: no series"
        chat = [(labels, count, total) for labels, count, total in series if labels["gen_ai_operation_name"] == "chat"]
        assert chat, f"{name}: no chat series in {series}"
        for labels, count, total in chat:
            assert labels["gen_ai_provider_name"] == "onnxruntime"
            assert labels["gen_ai_request_model"] and labels["gen_ai_response_model"]
            assert count >= 1
            # Seconds, not milliseconds: a step of a 135M model on a CPU is well under ten seconds.
            assert 0 < total / count < 10, (name, total, count)

    # Every service that served the turn: its RPCs' durations in seconds, with the conventions' attributes.
    served = {
        "ingest": "llmos.v1.IngestService/SubmitDocument",
        "dialogue": "llmos.v1.DialogueService/Chat",
        "retrieval": "llmos.v1.RetrievalService/Search",
        "inference": "llmos.v1.InferenceService/Generate",
    }
    for service, method in served.items():
        family = scraped[service][SERVER_DURATION]
        assert family.type == "histogram"
        series = counts(family)
        assert method in methods(series), (service, methods(series))
        for labels, count, total in series:
            assert labels["rpc_system_name"] == "grpc" and labels["llmos_service"] == service
            assert labels["rpc_response_status_code"], labels
            assert 0 <= total / count < 120, (service, labels, total, count)
        ok = [labels for labels, _, _ in series if labels["rpc_method"] == method and labels["rpc_response_status_code"] == "OK"]
        # A family's series share one label set in the text: a success has an empty error_type.
        assert ok and not ok[0].get("error_type"), (service, series)

    # The caller's side: dialogue timed its calls to inference and retrieval as a client.
    called = methods(counts(scraped["dialogue"][CLIENT_DURATION]))
    assert {"llmos.v1.InferenceService/Embed", "llmos.v1.RetrievalService/Search"} <= called, called
    # The bus: audit handled the turn's audit records.
    processed = counts(scraped["audit"][PROCESS_DURATION])
    assert any(labels["messaging_system"] == "nats" and labels["messaging_operation_name"] == "process" for labels, _, _ in processed)


async def test_outgoing_calls_are_client_spans_and_publishes_producer_spans(stack: RunningStack) -> None:
    responses = await chat_turn(stack)
    assert responses[-1].final
    span_file = stack.home / "telemetry" / SPAN_FILE
    search_server: dict[str, Any] | None = None
    trace: list[dict[str, Any]] = []
    for _ in range(100):  # span processors flush every 0.5 s
        spans = read_spans(span_file)
        by_id = {span["span_id"]: span for span in spans}
        # The turn's search: retrieval serving dialogue's call.
        search_server = next(
            (span for span in reversed(spans) if span["service"] == "retrieval" and span["kind"] == "SERVER"
             and span["name"] == "llmos.v1.RetrievalService/Search"
             and by_id.get(span["parent_span_id"], {}).get("service") == "dialogue"),
            None,
        )
        if search_server is not None:
            trace = [span for span in spans if span["trace_id"] == search_server["trace_id"]]
            if any(span["service"] == "audit" and span["kind"] == "CONSUMER" for span in trace):
                break
        await asyncio.sleep(0.1)
    assert search_server is not None, "no Search span called by dialogue"
    client = by_id[search_server["parent_span_id"]]
    assert client["kind"] == "CLIENT" and client["name"] == "llmos.v1.RetrievalService/Search"
    assert client["attributes"]["rpc.method"] == "llmos.v1.RetrievalService/Search"
    assert client["attributes"]["rpc.system.name"] == "grpc" and client["attributes"]["rpc.response.status_code"] == "OK"
    # The turn's publishes: each a PRODUCER span of dialogue in the same trace, parent of audit's CONSUMER span.
    producers = [span for span in trace if span["kind"] == "PRODUCER" and span["service"] == "dialogue"]
    assert producers, [(span["service"], span["kind"], span["name"]) for span in trace]
    assert all(span["attributes"]["messaging.operation.type"] == "send" for span in producers)
    consumers = [span for span in trace if span["kind"] == "CONSUMER" and span["service"] == "audit"]
    assert any(by_id.get(span["parent_span_id"], {}).get("kind") == "PRODUCER" for span in consumers), consumers
