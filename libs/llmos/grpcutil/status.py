"""The one place where platform errors become gRPC status codes."""

from __future__ import annotations

import re

import grpc

from llmos import errors

_STATUS_BY_ERROR: dict[type[errors.LlmosError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}

# Trailing metadata telling a client how long to back off after RESOURCE_EXHAUSTED: gRPC's standard
# retry pushback (milliseconds as a decimal string), which gRPC clients with a retry policy obey.
RETRY_AFTER_MS_KEY = "grpc-retry-pushback-ms"
# The hint a ResourceExhausted message ends with: a relayed refusal states its own hint once.
_RETRY_HINT = re.compile(r" \(retry after [0-9.]+ s\)$")


def status_for(error: errors.LlmosError) -> grpc.StatusCode:
    for error_type in type(error).__mro__:
        if error_type in _STATUS_BY_ERROR:
            return _STATUS_BY_ERROR[error_type]
    return grpc.StatusCode.UNKNOWN


def trailing_metadata_for(error: errors.LlmosError) -> tuple[tuple[str, str], ...]:
    if isinstance(error, errors.ResourceExhausted):
        return ((RETRY_AFTER_MS_KEY, str(max(0, round(error.retry_after_s * 1000)))),)
    return ()


def error_from_rpc(error: grpc.aio.AioRpcError, callee: str) -> errors.LlmosError:
    """Turn a failed call to another service back into a platform error, keeping its meaning."""
    message = f"{callee}: {error.details()}"
    for error_type, code in _STATUS_BY_ERROR.items():
        if code == error.code() and error_type not in (errors.InvalidArgument, errors.ResourceExhausted):
            return error_type(message)
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return errors.InvalidArgument(callee, error.details() or "invalid argument")
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.ResourceExhausted(_RETRY_HINT.sub("", message), retry_after_s=_retry_after_s(error))
    return errors.Unavailable(message)


def _retry_after_s(error: grpc.aio.AioRpcError) -> float:
    """The back-off the service asked for in its trailers (`trailing_metadata_for`), else 1 s."""
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_MS_KEY and str(value).isdigit():
            return int(value) / 1000
    return 1.0
