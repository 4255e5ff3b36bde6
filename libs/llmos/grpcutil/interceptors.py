"""Server and client interceptors applied to every gRPC call of the platform.

On the server, one interceptor wraps each handler so that, in order: the caller's trace context
is extracted from metadata and a SERVER span opened; the caller is authenticated and authorized
for the method (`llmos.policy`), every refusal and every call touching a tenant's data is
audited (an allowed call whose record cannot be published is refused: UNAVAILABLE), and the
principal is kept for the request; a malformed request becomes
INVALID_ARGUMENT instead of an internal error; and platform errors are mapped to status codes
(`llmos.grpcutil.status`).
On the client, the current trace context travels in metadata with the call's credentials: a
service's channel signs an assertion for the principal it acts for, addressed to the callee
(`llmos.assertions`); a caller's API key is never forwarded.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from llmos import errors
from llmos.audit import ALLOW, DENY, audit_event
from llmos.auth import AUTHORIZATION_HEADER, Principal, acting_as
from llmos.grpcutil.status import status_for, trailing_metadata_for
from llmos.policy import DATA_PERMISSIONS, authorize
from llmos.telemetry import extract_context, inject_context
from llmos.v1 import events_pb2

logger = logging.getLogger(__name__)

# Methods anyone may call without credentials: probes and API discovery.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


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


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Tracing, request validation, authentication and error mapping for every RPC."""

    def __init__(self, service: str, authenticator: Authenticator, audit_sink: AuditSink | None = None) -> None:
        self._service = service
        self._authenticator = authenticator
        self._audit_sink = audit_sink
        self._tracer = trace.get_tracer("llmos.grpc")
        self._duration = metrics.get_meter("llmos.grpc").create_histogram(
            "rpc.server.duration", unit="ms", description="time to serve an RPC, by method and status"
        )

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
        rpc_service, _, rpc_method = method.lstrip("/").partition("/")
        return self._tracer.start_span(
            method.lstrip("/"),
            context=extract_context(metadata),
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": rpc_service,
                "rpc.method": rpc_method,
                "llmos.service": self._service,
            },
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

    async def _call(
        self, method: str, context: grpc.aio.ServicerContext, run: Callable[[], Awaitable[Any]], request: Any
    ) -> Any:
        span = self._start_span(method, context)
        started = time.perf_counter()
        with trace.use_span(span, end_on_exit=True):
            try:
                principal = await self._admit(method, context, span, request)
                with acting_as(principal):
                    result = await run()
                span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
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
                    responses = open_stream()
                    if inspect.isasyncgen(responses):
                        async for response in responses:
                            yield response
                    else:
                        await responses
                span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
            except errors.LlmosError as exc:
                await self._abort(context, span, exc)
            except Exception as exc:  # noqa: BLE001 - any other failure is reported as INTERNAL
                await self._abort_internal(context, span, method, exc)
            finally:
                self._record(method, started, span)

    def _record(self, method: str, started: float, span: trace.Span) -> None:
        attributes = getattr(span, "attributes", None) or {}
        self._duration.record(
            (time.perf_counter() - started) * 1000,
            {
                "rpc.method": method.lstrip("/"),
                "rpc.grpc.status_code": attributes.get("rpc.grpc.status_code", grpc.StatusCode.UNKNOWN.value[0]),
                "llmos.service": self._service,
            },
        )

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, span: trace.Span, error: errors.LlmosError) -> None:
        code = status_for(error)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
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
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.INTERNAL.value[0])
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
    def __init__(self, credentials: CallCredentials) -> None:
        self._credentials = credentials

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
        return await continuation(self._details(client_call_details), request)


class UnaryStreamClientInterceptor(_ClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class StreamUnaryClientInterceptor(_ClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class StreamStreamClientInterceptor(_ClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def client_interceptors(credentials: CallCredentials) -> list[grpc.aio.ClientInterceptor]:
    return [
        UnaryUnaryClientInterceptor(credentials),
        UnaryStreamClientInterceptor(credentials),
        StreamUnaryClientInterceptor(credentials),
        StreamStreamClientInterceptor(credentials),
    ]
