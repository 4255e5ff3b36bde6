"""A request's deadline as one moment on the monotonic clock.

gRPC hands a server the seconds left (`time_remaining()`) and takes a timeout in seconds from now
on each call; a deadline passed down a call chain as either would mean something different at
every step. A `Deadline` is the moment itself (on `time.monotonic()`, the clock asyncio's loop
uses), and each call derives its timeout from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from llmos.errors import DeadlineExceeded


class HasTimeRemaining(Protocol):
    """A gRPC servicer context, as far as its deadline goes."""

    def time_remaining(self) -> float | None: ...


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic() seconds

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @classmethod
    def of(cls, context: HasTimeRemaining) -> Deadline | None:
        """The caller's deadline, or None when the caller set none."""
        left = context.time_remaining()
        return None if left is None else cls.after(left)

    def remaining(self) -> float:
        """Seconds left; zero or less once the deadline has passed."""
        return self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0


def timeout_within(deadline: Deadline | None, default_s: float) -> float:
    """The timeout of the next call: the seconds left before `deadline`, or `default_s` when
    there is none. A deadline already passed fails here rather than in a call doomed to."""
    if deadline is None:
        return default_s
    left = deadline.remaining()
    if left <= 0:
        raise DeadlineExceeded("the request's deadline passed before its work was complete")
    return left
