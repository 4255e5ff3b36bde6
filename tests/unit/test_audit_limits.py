"""Audit records stay small whatever a caller sends, and a call that cannot be audited is refused.

An anonymous call with a 1 MB `document_id` used to be audited with the whole field (redacted,
stored forever, or lost over the NATS payload limit), and an allowed call whose audit record
could not be published was served unaudited.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.errors import NotFoundError

from llmos import errors
from llmos.audit import ALLOW, DENY, MAX_AUDIT_TEXT_CHARS, audit_event
from llmos.auth import Principal
from llmos.bus.broker import declare_streams
from llmos.bus.subjects import STREAMS
from llmos.grpcutil.interceptors import ServerInterceptor
from llmos.v1 import events_pb2, ingest_pb2

pytestmark = pytest.mark.unit

METHOD = "/llmos.v1.IngestService/GetDocumentStatus"  # documents:read, audited when allowed
HUGE = 1_000_000


def test_a_huge_resource_or_reason_is_cut_with_a_marker_of_its_length() -> None:
    event = audit_event("ingest", "alice", "acme", "ingest/status", "document/" + "x" * HUGE, DENY, "y" * HUGE)
    for text, length in ((event.resource, HUGE + len("document/")), (event.reason, HUGE)):
        assert len(text) < MAX_AUDIT_TEXT_CHARS + 64 and text.endswith(f"[cut from {length} characters]")
    assert len(event.SerializeToString()) < 8 * MAX_AUDIT_TEXT_CHARS


def test_personal_data_straddling_the_cut_is_redacted_whole() -> None:
    email = "jane.doe@example.com"
    resource = "document/" + "x " * (MAX_AUDIT_TEXT_CHARS // 2 - 7) + email + " tail" * 1000
    event = audit_event("ingest", "alice", "acme", "ingest/status", resource, DENY)
    assert "jane" not in event.resource and "[cut from" in event.resource


def test_short_fields_are_kept_whole() -> None:
    event = audit_event("ingest", "alice", "acme", "ingest/status", "document/faq", ALLOW, "no reason")
    assert (event.resource, event.reason) == ("document/faq", "no reason")


class Context:
    """The parts of a grpc.aio.ServicerContext the interceptor uses; abort raises like grpc's."""

    def __init__(self, authorization: str | None) -> None:
        self._metadata = (("authorization", authorization),) if authorization else ()
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError()


class Authenticator:
    async def authenticate(self, authorization: str | None) -> Principal:
        if authorization != "Bearer alice":
            raise errors.Unauthenticated("no valid API key")
        return Principal("alice", "acme", frozenset({"user"}))


class Sink:
    """Collects audit events, or fails every publish like a bus that refuses them."""

    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.events: list[events_pb2.AuditEvent] = []

    async def __call__(self, event: events_pb2.AuditEvent) -> None:
        if self.fails:
            raise RuntimeError("nats: maximum payload exceeded")
        self.events.append(event)


async def call(sink: Sink, authorization: str | None, request: ingest_pb2.GetDocumentStatusRequest) -> tuple[Context, list[str]]:
    """One unary call through the interceptor; returns its context and what the handler served."""
    served: list[str] = []

    async def behaviour(message: ingest_pb2.GetDocumentStatusRequest, context: Any) -> ingest_pb2.DocumentStatus:
        served.append(message.document_id)
        return ingest_pb2.DocumentStatus(document_id=message.document_id)

    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(behaviour)

    interceptor = ServerInterceptor("ingest", Authenticator(), sink)
    handler = await interceptor.intercept_service(continuation, type("Details", (), {"method": METHOD})())
    context = Context(authorization)
    try:
        await handler.unary_unary(request, context)
    except grpc.aio.AbortError:
        pass
    return context, served


async def test_an_allowed_call_whose_audit_record_cannot_be_published_is_refused() -> None:
    context, served = await call(Sink(fails=True), "Bearer alice", ingest_pb2.GetDocumentStatusRequest(document_id="faq"))
    assert served == []
    assert context.code == grpc.StatusCode.UNAVAILABLE and "audit" in context.details


async def test_an_allowed_call_is_served_once_audited() -> None:
    sink = Sink(fails=False)
    context, served = await call(sink, "Bearer alice", ingest_pb2.GetDocumentStatusRequest(document_id="faq"))
    assert served == ["faq"] and context.code is None
    assert [(event.decision, event.resource) for event in sink.events] == [(ALLOW, "document/faq")]


async def test_a_denied_call_keeps_its_denial_when_the_audit_publish_fails() -> None:
    context, served = await call(Sink(fails=True), None, ingest_pb2.GetDocumentStatusRequest(document_id="faq"))
    assert served == [] and context.code == grpc.StatusCode.UNAUTHENTICATED


async def test_an_anonymous_call_with_a_huge_document_id_is_audited_in_bounded_size() -> None:
    sink = Sink(fails=False)
    context, _ = await call(sink, None, ingest_pb2.GetDocumentStatusRequest(document_id="d" * HUGE))
    (event,) = sink.events
    assert context.code == grpc.StatusCode.UNAUTHENTICATED and event.decision == DENY
    assert len(event.SerializeToString()) < 8 * MAX_AUDIT_TEXT_CHARS and "[cut from" in event.resource


def test_the_audit_stream_bounds_its_messages_and_its_size() -> None:
    (audit,) = [spec for spec in STREAMS if spec.name == "AUDIT"]
    largest = audit_event("s" * HUGE, "p" * HUGE, "t" * HUGE, "a" * HUGE, "\U0001f600" * HUGE, DENY, "\U0001f600" * HUGE)
    assert 0 < len(largest.SerializeToString()) < audit.max_msg_size
    assert 0 < audit.max_bytes


class JetStream:
    """Stream info and updates as the server gives them, for one existing stream per name."""

    def __init__(self, existing: dict[str, StreamConfig]) -> None:
        self.streams = existing
        self.updated: list[str] = []

    async def stream_info(self, name: str) -> Any:
        if name not in self.streams:
            raise NotFoundError()
        return type("Info", (), {"config": self.streams[name]})()

    async def add_stream(self, config: StreamConfig) -> None:
        self.streams[config.name] = config

    async def update_stream(self, config: StreamConfig) -> None:
        self.streams[config.name] = config
        self.updated.append(config.name)

    async def create_key_value(self, config: KeyValueConfig) -> None:
        self.streams[f"KV_{config.bucket}"] = StreamConfig(
            name=f"KV_{config.bucket}", allow_direct=config.direct, num_replicas=config.replicas
        )


async def test_llmos_streams_brings_an_unbounded_audit_stream_to_its_limits() -> None:
    js = JetStream({})
    await declare_streams(js)  # type: ignore[arg-type]
    (audit,) = [spec for spec in STREAMS if spec.name == "AUDIT"]
    assert (js.streams["AUDIT"].max_msg_size, js.streams["AUDIT"].max_bytes) == (audit.max_msg_size, audit.max_bytes)
    unbounded = StreamConfig(**{**js.streams["AUDIT"].as_dict(), "max_msg_size": -1, "max_bytes": -1})
    js.streams["AUDIT"] = StreamConfig.from_response(unbounded.as_dict())
    await declare_streams(js)  # type: ignore[arg-type]  # a service leaves it
    assert js.updated == []
    await declare_streams(js, update=True)  # type: ignore[arg-type]  # `llmos streams`, `llmos up`
    assert js.updated == ["AUDIT"] and js.streams["AUDIT"].max_msg_size == audit.max_msg_size
