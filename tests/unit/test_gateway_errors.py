"""The gateway's one mapping from platform errors to HTTP statuses and OpenAI's error object."""

from __future__ import annotations

import pytest

from llmos import errors
from services.gateway.errors import ModelNotFound, RequestTooLarge, error_response_parts

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (errors.InvalidArgument("messages", "is empty"), 400, "invalid_request_error"),
        (errors.FailedPrecondition("models not built"), 400, "invalid_request_error"),
        (errors.Unauthenticated("unknown key"), 401, "authentication_error"),
        (errors.PermissionDenied("lacks chat"), 403, "permission_error"),
        (errors.NotFound("no document"), 404, "not_found_error"),
        (ModelNotFound("no model"), 404, "invalid_request_error"),
        (RequestTooLarge("too big"), 413, "invalid_request_error"),
        (errors.ResourceExhausted("queue full", retry_after_s=2.2), 429, "rate_limit_error"),
        (errors.Unavailable("inference down"), 503, "service_unavailable"),
        (errors.DeadlineExceeded("too slow"), 504, "timeout"),
    ],
)
def test_each_platform_error_has_its_status_and_an_openai_error_object(error: errors.LlmosError, status: int, kind: str) -> None:
    got_status, body, _ = error_response_parts(error)
    assert got_status == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == kind
    assert body["error"]["message"] == error.message


def test_invalid_argument_names_its_field_as_param() -> None:
    _, body, _ = error_response_parts(errors.InvalidArgument("messages[0].content", "part of type 'image_url' is not supported"))
    assert body["error"]["param"] == "messages[0].content"


def test_model_not_found_carries_openais_code() -> None:
    _, body, _ = error_response_parts(ModelNotFound("model 'gpt-4' does not exist"))
    assert body["error"]["code"] == "model_not_found"


def test_a_full_queue_tells_when_to_retry_in_seconds_and_milliseconds() -> None:
    _, _, headers = error_response_parts(errors.ResourceExhausted("queue full", retry_after_s=2.2))
    assert headers == {"Retry-After": "3", "retry-after-ms": "2200"}
    _, _, headers = error_response_parts(errors.ResourceExhausted("queue full", retry_after_s=0.05))
    assert headers["Retry-After"] == "1"  # never 0: that would invite an immediate retry


def test_only_a_full_queue_has_retry_headers() -> None:
    assert error_response_parts(errors.Unavailable("down"))[2] == {}
