"""Limits every gRPC server of the platform applies, so that no caller can take a service for itself.

- A server serves at most `max_concurrent_rpcs` calls at once; past that a call is refused before it
  is authenticated. gRPC's own `maximum_concurrent_rpcs` is set PROBE_HEADROOM higher: health
  probes (never refused here) still answer on a saturated server, and nothing gets past gRPC's limit.
- One principal (a subject of a tenant) has at most `principal_max_calls` calls in flight on a
  server, of which at most `principal_max_streams` client streams (Converse, StreamingRecognize:
  calls that only the client ends).
- A client stream lasts at most `max_stream_s`, then ends with RESOURCE_EXHAUSTED.

Every refusal is `errors.ResourceExhausted`: RESOURCE_EXHAUSTED naming the limit, with the retry
hint in gRPC's standard `grpc-retry-pushback-ms` trailer (`llmos.grpcutil.status`). Principals of
the `service` role (a service acting on a bus event) are held by the server limit only: their work
is bounded by their bus consumers, and a refusal would dead-letter a good message.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from llmos import errors
from llmos.auth import Principal, current_principal
from llmos.grpcutil.interceptors import GuardedServerInterceptor
from llmos.grpcutil.status import status_for, trailing_metadata_for
from llmos.settings import PlatformSettings

# Calls gRPC admits beyond `max_concurrent_rpcs` before refusing by itself: room for health probes.
PROBE_HEADROOM = 16
SERVICE_ROLE = "service"


@dataclass(frozen=True)
class QuotaLimits:
    max_concurrent_rpcs: int
    principal_max_calls: int
    principal_max_streams: int
    max_stream_s: float
    retry_after_s: float

    @classmethod
    def from_settings(cls, settings: PlatformSettings) -> QuotaLimits:
        """The limits of `llmos.settings.PlatformSettings` (LLMOS_MAX_CONCURRENT_RPCS, …)."""
        return cls(
            settings.max_concurrent_rpcs,
            settings.principal_max_calls,
            settings.principal_max_streams,
            settings.max_stream_s,
            settings.quota_retry_after_s,
        )

    @property
    def grpc_maximum_concurrent_rpcs(self) -> int:
        return self.max_concurrent_rpcs + PROBE_HEADROOM


Release = Callable[..., None]  # also gRPC's done callback, which passes the call's context


def _once(release: Release) -> Release:
    """`release`, callable any number of times, acting once: a call's end is seen twice (the
    handler's own `finally` and gRPC's done callback, which also covers a handler never closed)."""
    released = False

    def release_once(*_: object) -> None:
        nonlocal released
        if not released:
            released = True
            release()

    return release_once


class Quotas:
    """Counts of calls in flight, on the server and per principal; each `admit_*` takes one (and
    returns its release) or refuses with ResourceExhausted."""

    def __init__(self, limits: QuotaLimits) -> None:
        self.limits = limits
        self._server_calls = 0
        self._calls: Counter[tuple[str, str]] = Counter()
        self._streams: Counter[tuple[str, str]] = Counter()

    def in_flight(self, principal: Principal) -> tuple[int, int]:
        """(calls, client streams) `principal` has in flight."""
        key = (principal.tenant, principal.subject)
        return self._calls[key], self._streams[key]

    def admit_server_call(self, method: str) -> Release:
        if self._server_calls >= self.limits.max_concurrent_rpcs:
            raise errors.ResourceExhausted(
                f"{method.lstrip('/')} was refused: the service is serving its limit of "
                f"{self.limits.max_concurrent_rpcs} calls at once; retry later",
                self.limits.retry_after_s,
            )
        self._server_calls += 1

        def release() -> None:
            self._server_calls -= 1

        return _once(release)

    def admit_principal_call(self, principal: Principal, method: str, stream: bool) -> Release:
        if SERVICE_ROLE in principal.roles:
            return _once(lambda: None)
        key = (principal.tenant, principal.subject)
        limits = self.limits
        who = f"{principal.subject!r} of tenant {principal.tenant!r}"
        if self._calls[key] >= limits.principal_max_calls:
            raise errors.ResourceExhausted(
                f"{method.lstrip('/')} was refused: {who} already has {limits.principal_max_calls} calls in flight "
                "on this service, its limit; wait for one to end",
                limits.retry_after_s,
            )
        if stream and self._streams[key] >= limits.principal_max_streams:
            plural = "s" if limits.principal_max_streams != 1 else ""
            raise errors.ResourceExhausted(
                f"{method.lstrip('/')} was refused: {who} already has {limits.principal_max_streams} stream{plural} "
                "open on this service, its limit; close one first",
                limits.retry_after_s,
            )
        counts = (self._calls, self._streams) if stream else (self._calls,)
        for count in counts:
            count[key] += 1

        def release() -> None:
            for count in counts:
                count[key] -= 1
                if not count[key]:
                    del count[key]  # principals come and go: keep only those with calls in flight

        return _once(release)


def stream_too_long(method: str, limit_s: float) -> errors.ResourceExhausted:
    # Nothing to wait for: a new stream may start at once.
    return errors.ResourceExhausted(
        f"{method.lstrip('/')} reached the {limit_s:g} s limit on a stream's duration and was ended; "
        "open a new stream to go on",
        0.0,
    )


class ServerLimitInterceptor(GuardedServerInterceptor):
    """The server-wide limit; first in the server's list, so a refused call costs no authentication.

    It runs outside the interceptor that maps platform errors, so it sends its refusal itself.
    """

    def __init__(self, quotas: Quotas) -> None:
        self._quotas = quotas

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        quotas = self._quotas

        async def admit(context: grpc.aio.ServicerContext) -> Release:
            try:
                release = quotas.admit_server_call(method)
            except errors.ResourceExhausted as exc:
                await context.abort(status_for(exc), exc.message, trailing_metadata_for(exc))
            context.add_done_callback(release)
            return release

        if handler.unary_unary or handler.stream_unary:
            unary = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                release = await admit(context)
                try:
                    return await unary(request, context)
                finally:
                    release()

            return handler._replace(**{"unary_unary" if handler.unary_unary else "stream_unary": unary_response})
        streaming = handler.unary_stream or handler.stream_stream

        async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            release = await admit(context)
            try:
                async for response in streaming(request, context):
                    yield response
            finally:
                release()

        return handler._replace(**{"unary_stream" if handler.unary_stream else "stream_stream": stream_response})


class PrincipalQuotaInterceptor(GuardedServerInterceptor):
    """Per-principal quotas, and the duration of client streams.

    It comes after the interceptor that authenticates in the server's list (it needs the principal),
    so its refusals are mapped, traced and logged like any platform error.
    """

    def __init__(self, quotas: Quotas) -> None:
        self._quotas = quotas

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        quotas = self._quotas
        limit_s = quotas.limits.max_stream_s

        def admit(context: grpc.aio.ServicerContext, stream: bool) -> Release:
            release = quotas.admit_principal_call(current_principal(), method, stream)
            context.add_done_callback(release)
            return release

        if handler.unary_unary:
            unary_unary = handler.unary_unary

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                release = admit(context, stream=False)
                try:
                    return await unary_unary(request, context)
                finally:
                    release()

            return handler._replace(unary_unary=call)
        if handler.unary_stream:
            unary_stream = handler.unary_stream

            async def server_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                release = admit(context, stream=False)
                try:
                    async for response in unary_stream(request, context):
                        yield response
                finally:
                    release()

            return handler._replace(unary_stream=server_stream)
        if handler.stream_unary:
            stream_unary = handler.stream_unary

            async def client_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                release = admit(context, stream=True)
                try:
                    async with asyncio.timeout(limit_s):
                        return await stream_unary(requests, context)
                except TimeoutError:
                    raise stream_too_long(method, limit_s) from None
                finally:
                    release()

            return handler._replace(stream_unary=client_stream)
        stream_stream = handler.stream_stream

        async def bidirectional(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            release = admit(context, stream=True)
            # At the limit the call is cancelled where it waits (a read, the handler's own work) and
            # ends with RESOURCE_EXHAUSTED. One blocked writing to a client that does not read is
            # cancelled in gRPC's write instead: it ends too, and that client, not reading, sees no status.
            try:
                async with asyncio.timeout(limit_s):
                    async for response in stream_stream(requests, context):
                        yield response
            except TimeoutError:
                raise stream_too_long(method, limit_s) from None
            finally:
                release()

        return handler._replace(stream_stream=bidirectional)


def quota_interceptors(limits: QuotaLimits) -> tuple[ServerLimitInterceptor, PrincipalQuotaInterceptor]:
    """The two interceptors of one server, sharing its counts: the first goes first in the server's
    list, the second after the interceptor that authenticates."""
    quotas = Quotas(limits)
    return ServerLimitInterceptor(quotas), PrincipalQuotaInterceptor(quotas)
