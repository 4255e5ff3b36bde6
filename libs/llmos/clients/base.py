"""What every client of a platform service does the same way.

A call carries the caller's credentials (or none: a service's channel signs each call for the
principal it serves, `llmos.grpcutil.client.service_channel`, replacing any credentials given
here) and a timeout in seconds (None: no deadline); a failed call
becomes the platform error with the same meaning, named after the service that failed
(`error_from_rpc`), so callers handle `llmos.errors` and never gRPC's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc

from llmos.grpcutil.status import error_from_rpc

Metadata = tuple[tuple[str, str], ...]
Response = TypeVar("Response")
Stub = TypeVar("Stub")
Client = TypeVar("Client", bound="ServiceClient[Any]")


class ServiceClient(Generic[Stub]):
    """The stub of one service, the credentials its calls carry, and its errors mapped once."""

    service = ""  # the callee's name in error messages
    stub_type: Callable[[grpc.aio.Channel], Stub]  # the generated stub of the service

    def __init__(self, channel: grpc.aio.Channel, metadata: Metadata = ()) -> None:
        self._channel = channel
        self._metadata = metadata or None
        self._stub = type(self).stub_type(channel)

    def with_credentials(self: Client, metadata: Metadata) -> Client:
        """The same service over the same channel, calling as another caller (a gateway serving
        each request with that request's key)."""
        return type(self)(self._channel, metadata)

    async def _unary(
        self, method: Callable[..., Awaitable[Response]], request: Any, timeout_s: float | None
    ) -> Response:
        try:
            return await method(request, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self.service) from None

    async def _stream(self, method: Callable[..., Any], request: Any, timeout_s: float | None) -> AsyncIterator[Any]:
        """The responses of a server-streaming call (`request` may be an iterator of requests:
        client and bidirectional streaming). A reader that stops early (a looping answer, a
        barge-in) and closes the iterator cancels the call, so the service stops working for
        nobody; `contextlib.aclosing` closes it at once."""
        call = method(request, timeout=timeout_s, metadata=self._metadata)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self.service) from None
        finally:
            call.cancel()
