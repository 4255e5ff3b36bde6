"""The one place where platform errors become HTTP statuses and OpenAI's error object.

The `openai` client reads `{"error": {"message", "type", "param", "code"}}` and raises the
exception class of the status (BadRequestError for 400, RateLimitError for 429, …); it backs
off by `retry-after-ms` or `Retry-After` on 429 and 503.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llmos import errors


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str
    code: str | None


_HTTP_BY_ERROR: dict[type[errors.LlmosError], HttpError] = {
    errors.InvalidArgument: HttpError(400, "invalid_request_error", None),
    errors.FailedPrecondition: HttpError(400, "invalid_request_error", "failed_precondition"),
    errors.Unauthenticated: HttpError(401, "authentication_error", "invalid_api_key"),
    errors.PermissionDenied: HttpError(403, "permission_error", "permission_denied"),
    errors.NotFound: HttpError(404, "not_found_error", "not_found"),
    errors.AlreadyExists: HttpError(409, "conflict_error", "already_exists"),
    errors.ResourceExhausted: HttpError(429, "rate_limit_error", "rate_limit_exceeded"),
    errors.Cancelled: HttpError(499, "cancelled", "cancelled"),
    errors.Unimplemented: HttpError(501, "not_implemented", "not_implemented"),
    errors.Unavailable: HttpError(503, "service_unavailable", "service_unavailable"),
    errors.DeadlineExceeded: HttpError(504, "timeout", "deadline_exceeded"),
}
INTERNAL = HttpError(500, "server_error", "internal_error")


class RequestTooLarge(errors.LlmosError):
    """The request body is over the gateway's size limit (HTTP 413)."""


class ModelNotFound(errors.NotFound):
    """The `model` of a request is not one this platform serves."""


def http_error_for(error: errors.LlmosError) -> HttpError:
    if isinstance(error, RequestTooLarge):
        return HttpError(413, "invalid_request_error", "request_too_large")
    if isinstance(error, ModelNotFound):
        return HttpError(404, "invalid_request_error", "model_not_found")
    for error_type in type(error).__mro__:
        if error_type in _HTTP_BY_ERROR:
            return _HTTP_BY_ERROR[error_type]
    return INTERNAL


def error_body(message: str, kind: HttpError, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}


def error_response_parts(error: errors.LlmosError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) of the response reporting `error`."""
    kind = http_error_for(error)
    param = error.field if isinstance(error, errors.InvalidArgument) else None
    headers: dict[str, str] = {}
    if isinstance(error, errors.ResourceExhausted):
        # The scheduler's hint, whole seconds for Retry-After and exact for clients that read ms.
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
        headers["retry-after-ms"] = str(int(error.retry_after_s * 1000))
    return kind.status, error_body(error.message, kind, param), headers
