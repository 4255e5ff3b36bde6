"""Server and client interceptors applied to every gRPC call of the platform.

On the server, one interceptor wraps each handler so that, in order: the caller's trace context
is extracted from metadata and a SERVER span opened; the caller is authenticated and authorized
for the method (`llmos.policy`), every refusal and every call touching a tenant's data is
audited (an allowed call whose record cannot be published is refused: UNAVAILABLE), and the
principal is kept for the request; a malformed request becomes
INVALID_ARGUMENT instead of an internal error; and platform errors are mapped to status codes
(`llmos.grpcutil.status`).
On the client, each call is a CLIENT span whose context travels in metadata with the call's
credentials: a service's channel signs an assertion for the principal it acts for, addressed to
the callee (`llmos.assertions`); a caller's API key is never forwarded.
Span and metric names follow the OpenTelemetry RPC semantic conventions (`rpc.server.call.duration`
and `rpc.client.call.duration` in seconds, `rpc.system.name`, `rpc.method`, `rpc.response.status_code`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import metrics, trace
from opentelemetry.semconv._incubating.attributes.rpc_attributes import (
    RPC_METHOD,
    RPC_RESPONSE_STATUS_CODE,
    RPC_SYSTEM_NAME,
    RpcSystemNameValues,
)
from opentelemetry.semconv._incubating.metrics.rpc_metrics import RPC_CLIENT_CALL_DURATION, RPC_SERVER_CALL_DURATION
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import SpanKind, Status, StatusCode

from llmos import errors
from llmos.audit import ALLOW, DENY, audit_event
from llmos.auth import AUTHORIZATION_HEADER, Principal, acting_as
from llmos.grpcutil.status import status_for, trailing_metadata_for
from llmos.policy import DATA_PERMISSIONS, authorize
from llmos.telemetry import extract_context, inject_context, seconds_histogram
from llmos.v1 import events_pb2

logger = logging.getLogger(__name__)

# Methods anyone may call without credentials: probes and API discovery.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
GRPC = RpcSystemNameValues.GRPC.value


def status_attributes(code: grpc.StatusCode) -> dict[str, str]:
    """How a call ended, as the semantic conventions name it: the status code, and when it is
    not OK the same code as the error type."""
    if code == grpc.StatusCode.OK:
        return {RPC_RESPONSE_STATUS_CODE: code.name}
    return {RPC_RESPONSE_STATUS_CODE: code.name, ERROR_TYPE: code.name}


def rpc_attributes(method: str, code: grpc.StatusCode | None = None) -> dict[str, str]:
    """The semantic-convention attributes of a gRPC call to `method` ("/pkg.Service/Method"):
    the system and the fully-qualified method, and once it ended how (`status_attributes`)."""
    attributes = {RPC_SYSTEM_NAME: GRPC, RPC_METHOD: method.lstrip("/")}
    return attributes | status_attributes(code) if code is not None else attributes


class _MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the handler can reject it."""

    def __init__(self, message_name: str, error: Exception) -> None:
        self.message_name = message_name
        self.error = error

    def to_error(self) -> errors.InvalidArgument:
        return errors.InvalidArgument(
            "request",
            f"not a valid {self.message_name} message ({self.error}); "
            "check that every string field is valid UTF-8",
        )


def _tolerant_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    message_name = getattr(getattr(deserializer, "__self__", None), "__name__", "request")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _MalformedRequest(message_name, exc)

    return deserialize


def _checked(request: Any) -> Any:
    if isinstance(request, _MalformedRequest):
        raise request.to_error()
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


AuditSink = Callable[[events_pb2.AuditEvent], Awaitable[None]]
# Request fields that name what a call touches, in order of preference, for the audit trail.
_RESOURCE_FIELDS = ("document_id", "session_id", "user_id")


class Authenticator(Protocol):
    async def authenticate(self, authorization: str | None) -> Principal: ...


def _resource_of(request: Any) -> str:
    fields = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
    for name in _RESOURCE_FIELDS:
        if name in fields and getattr(request, name):
            return f"{name.removesuffix('_id')}/{getattr(request, name)}"
    return ""


class GuardedServerInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps the handler of every RPC but the public ones (health, reflection)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        return self._wrap(handler, method)

    @abstractmethod
    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler that serves `method` in place of `handler`."""


class ServerInterceptor(GuardedServerInterceptor):
    """Tracing, request validation, authentication and error mapping for every RPC."""

    def __init__(self, service: str, authenticator: Authenticator, audit_sink: AuditSink | None = None) -> None:
        self._service = service
        self._authenticator = authenticator
        self._audit_sink = audit_sink
        self._tracer = trace.get_tracer("llmos.grpc")
        self._duration = seconds_histogram(
            metrics.get_meter("llmos.grpc"), RPC_SERVER_CALL_DURATION, "time to serve an RPC, by method and status"
        )

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        call = self._call
        if handler.unary_unary:
            behaviour = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async def run() -> Any:
                    return await behaviour(_checked(request), context)

                return await call(method, context, run, request)

            return handler._replace(
                unary_unary=unary_unary,
                request_deserializer=_tolerant_deserializer(handler.request_deserializer),
            )
        if handler.unary_stream:
            behaviour = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for response in self._stream(
                    method, context, lambda: behaviour(_checked(request), context), request
                ):
                    yield response

            return handler._replace(
                unary_stream=unary_stream,
                request_deserializer=_tolerant_deserializer(handler.request_deserializer),
            )
        if handler.stream_unary:
            behaviour = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                async def run() -> Any:
                    return await behaviour(_checked_stream(requests), context)

                return await call(method, context, run, None)

            return handler._replace(
                stream_unary=stream_unary,
                request_deserializer=_tolerant_deserializer(handler.request_deserializer),
            )
        behaviour = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in self._stream(
                method, context, lambda: behaviour(_checked_stream(requests), context), None
            ):
                yield response

        return handler._replace(
            stream_stream=stream_stream,
            request_deserializer=_tolerant_deserializer(handler.request_deserializer),
        )

    def _start_span(self, method: str, context: grpc.aio.ServicerContext) -> trace.Span:
        metadata = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
        return self._tracer.start_span(
            method.lstrip("/"),
            context=extract_context(metadata),
            kind=SpanKind.SERVER,
            attributes={**rpc_attributes(method), "llmos.service": self._service},
        )

    async def _admit(
        self, method: str, context: grpc.aio.ServicerContext, span: trace.Span, request: Any
    ) -> Principal:
        """Authenticate and authorize the call; every refusal is audited before it is returned."""
        value = dict(context.invocation_metadata() or ()).get(AUTHORIZATION_HEADER)
        credentials = value if isinstance(value, str) else None
        principal: Principal | None = None
        try:
            principal = await self._authenticator.authenticate(credentials)
            span.set_attribute("enduser.id", principal.subject)
            span.set_attribute("llmos.tenant", principal.tenant)
            if principal.service:
                span.set_attribute("llmos.caller_service", principal.service)
            permission = authorize(principal, method)
        except (errors.Unauthenticated, errors.PermissionDenied) as exc:
            await self._audit(method, principal, request, DENY, exc.message)
            raise
        if permission in DATA_PERMISSIONS:
            await self._audit(method, principal, request, ALLOW, "")
        return principal

    async def _audit(
        self, method: str, principal: Principal | None, request: Any, decision: events_pb2.AuditDecision.ValueType, reason: str
    ) -> None:
        if self._audit_sink is None:
            return
        event = audit_event(
            self._service,
            principal.subject if principal else "anonymous",
            principal.tenant if principal else "",
            method.lstrip("/"),
            _resource_of(request),
            decision,
            reason,
        )
        try:
            await self._audit_sink(event)
        except Exception as exc:  # noqa: BLE001 - whatever the bus raised, the record is lost
            logger.exception("could not publish the audit event of %s", method)
            if decision == ALLOW:
                # Fail closed: a call that touches a tenant's data is not served unaudited.
                raise errors.Unavailable(
                    f"{method.lstrip('/')} was refused: its audit record could not be published; retry later"
                ) from exc

    @asynccontextmanager
    async def _refusals_audited(self, method: str, principal: Principal, request: Any) -> AsyncIterator[None]:
        """A refusal the handler itself makes (a tenant or a session not the caller's) is audited
        like the ones `_admit` makes: every denial leaves a record."""
        try:
            yield
        except (errors.Unauthenticated, errors.PermissionDenied) as exc:
            await self._audit(method, principal, request, DENY, exc.message)
            raise

    async def _call(
        self, method: str, context: grpc.aio.ServicerContext, run: Callable[[], Awaitable[Any]], request: Any
    ) -> Any:
        span = self._start_span(method, context)
        started = time.perf_counter()
        with trace.use_span(span, end_on_exit=True):
            try:
                principal = await self._admit(method, context, span, request)
                with acting_as(principal):
                    async with self._refusals_audited(method, principal, request):
                        result = await run()
                span.set_attributes(status_attributes(grpc.StatusCode.OK))
                return result
            except errors.LlmosError as exc:
                await self._abort(context, span, exc)
            except Exception as exc:  # noqa: BLE001 - any other failure is reported as INTERNAL
                await self._abort_internal(context, span, method, exc)
            finally:
                self._record(method, started, span)

    async def _stream(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        open_stream: Callable[[], Any],
        request: Any,
    ) -> AsyncIterator[Any]:
        span = self._start_span(method, context)
        started = time.perf_counter()
        with trace.use_span(span, end_on_exit=True):
            try:
                principal = await self._admit(method, context, span, request)
                with acting_as(principal):
                    async with self._refusals_audited(method, principal, request):
                        responses = open_stream()
                        if inspect.isasyncgen(responses):
                            async for response in responses:
                                yield response
                        else:
                            await responses
                span.set_attributes(status_attributes(grpc.StatusCode.OK))
            except errors.LlmosError as exc:
                await self._abort(context, span, exc)
            except Exception as exc:  # noqa: BLE001 - any other failure is reported as INTERNAL
                await self._abort_internal(context, span, method, exc)
            finally:
                self._record(method, started, span)

    def _record(self, method: str, started: float, span: trace.Span) -> None:
        attributes = getattr(span, "attributes", None) or {}
        code = grpc.StatusCode[attributes.get(RPC_RESPONSE_STATUS_CODE, grpc.StatusCode.UNKNOWN.name)]
        self._duration.record(
            time.perf_counter() - started, {**rpc_attributes(method, code), "llmos.service": self._service}
        )

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, span: trace.Span, error: errors.LlmosError) -> None:
        code = status_for(error)
        span.set_attributes(status_attributes(code))
        span.set_status(Status(StatusCode.ERROR, error.message))
        context.set_trailing_metadata(trailing_metadata_for(error))
        await context.abort(code, error.message)

    @staticmethod
    async def _abort_internal(
        context: grpc.aio.ServicerContext, span: trace.Span, method: str, error: Exception
    ) -> None:
        if isinstance(error, grpc.aio.AbortError):
            raise error
        trace_id = format(span.get_span_context().trace_id, "032x")
        logger.exception("%s failed (trace %s)", method, trace_id)
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.set_attributes(status_attributes(grpc.StatusCode.INTERNAL))
        await context.abort(
            grpc.StatusCode.INTERNAL, f"internal error in {method}; see the service log for trace {trace_id}"
        )


def outgoing_metadata(credentials: str | None) -> list[tuple[str, str]]:
    """Metadata for a call made now: the trace context, and `credentials` when given."""
    carrier: dict[str, str] = {}
    inject_context(carrier)
    if credentials:
        carrier[AUTHORIZATION_HEADER] = credentials
    return list(carrier.items())


# The `authorization` value of the call about to be made (None: the call's own metadata decides);
# called per call, so a service signs each call for the principal it acts for at that moment.
CallCredentials = Callable[[], str | None]


class _ClientInterceptor:
    """Each outgoing call a CLIENT span, ended (and timed) when the call is done; the span's
    context is what travels in the call's metadata."""

    def __init__(self, credentials: CallCredentials) -> None:
        self._credentials = credentials
        self._tracer = trace.get_tracer("llmos.grpc")
        self._duration = seconds_histogram(
            metrics.get_meter("llmos.grpc"),
            RPC_CLIENT_CALL_DURATION,
            "time from starting an RPC to its end, by method and status",
        )
        # Tasks ending spans, held until they ran (the event loop keeps only weak references).
        self._ending: set[asyncio.Task[None]] = set()

    async def _traced(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        span = self._tracer.start_span(method.lstrip("/"), kind=SpanKind.CLIENT, attributes=rpc_attributes(method))
        started, loop = time.perf_counter(), asyncio.get_running_loop()
        try:
            with trace.use_span(span, end_on_exit=False):
                call = await continuation(self._details(details), request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise

        def done(finished: grpc.aio.Call) -> None:
            ended_ns, elapsed = time.time_ns(), time.perf_counter() - started
            task = loop.create_task(self._end(finished, method, span, ended_ns, elapsed))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

        call.add_done_callback(done)
        return call

    async def _end(self, call: grpc.aio.Call, method: str, span: trace.Span, ended_ns: int, elapsed: float) -> None:
        code = await call.code()  # the call is done: this does not wait
        span.set_attributes(status_attributes(code))
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end(end_time=ended_ns)
        self._duration.record(elapsed, rpc_attributes(method, code))

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        credentials = self._credentials()
        metadata = list(details.metadata or ())
        if credentials is not None:
            # The channel's credentials replace any the call carried: a service's call carries its
            # assertion and nothing else, never a key handed to it.
            metadata = [(key, value) for key, value in metadata if key.lower() != AUTHORIZATION_HEADER]
        metadata += outgoing_metadata(credentials)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, grpc.aio.Metadata(*metadata), details.credentials, details.wait_for_ready
        )


class UnaryUnaryClientInterceptor(_ClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._traced(continuation, client_call_details, request)


class UnaryStreamClientInterceptor(_ClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._traced(continuation, client_call_details, request)


class StreamUnaryClientInterceptor(_ClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await self._traced(continuation, client_call_details, request_iterator)


class StreamStreamClientInterceptor(_ClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await self._traced(continuation, client_call_details, request_iterator)


def client_interceptors(credentials: CallCredentials) -> list[grpc.aio.ClientInterceptor]:
    return [
        UnaryUnaryClientInterceptor(credentials),
        UnaryStreamClientInterceptor(credentials),
        StreamUnaryClientInterceptor(credentials),
        StreamStreamClientInterceptor(credentials),
    ]
