"""The platform's error hierarchy.

Core logic raises these; transports translate them: gRPC maps each to a status code in
`llmos.grpcutil.status`, the bus sends messages that fail with them to the dead-letter subject.
Messages are written for the person who will read them: say what was wrong and what to do.
"""

from __future__ import annotations


class LlmosError(Exception):
    """Base of every error the platform reports on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(LlmosError):
    """The request itself is wrong; retrying it unchanged will fail again."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(LlmosError):
    """The named resource does not exist (or is not visible to the caller's tenant)."""


class AlreadyExists(LlmosError):
    """The resource to create exists already."""


class Unauthenticated(LlmosError):
    """No credentials, or credentials that do not identify anyone."""


class PermissionDenied(LlmosError):
    """The caller is known but may not do this."""


class ResourceExhausted(LlmosError):
    """A queue or quota is full; the caller may retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(f"{message} (retry after {retry_after_s:.1f} s)")
        self.retry_after_s = retry_after_s


class FailedPrecondition(LlmosError):
    """The system is not in a state that allows the operation (e.g. models not built)."""


class Unavailable(LlmosError):
    """A dependency is down or not ready yet; retrying later may succeed."""


class DeadlineExceeded(LlmosError):
    """The request's deadline passed before it could be completed."""


class Cancelled(LlmosError):
    """The caller went away or asked to stop."""


class Unimplemented(LlmosError):
    """The operation is part of the API but not built yet."""
