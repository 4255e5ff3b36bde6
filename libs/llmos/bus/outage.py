"""Riding out a JetStream stream without a leader.

A cluster node lost, an election under way: for seconds on a loaded machine a stream (a KV
bucket is one) answers no publish, and NATS says so as "no responders", "no response from
stream" or a timeout. Writing again with the same message id (which JetStream deduplicates), or
the same compare-and-set, is safe, so the bus and the KV buckets retry for up to
`OUTAGE_RETRY_S` rather than fail a handler and spend its message's deliveries, and then its
document, on an outage of the bus (issue 16, item 3).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError

logger = logging.getLogger(__name__)

T = TypeVar("T")

LEADERLESS_ERRORS = (NoRespondersError, NoStreamResponseError, NatsTimeoutError)
# Within the consumers' ack wait (60 s), so a handler's message is not redelivered meanwhile.
OUTAGE_RETRY_S = 30.0


async def while_leaderless(operation: Callable[[], Awaitable[T]], what: str) -> T:
    """Run `operation`, again after a back-off while the stream has no leader, for up to
    `OUTAGE_RETRY_S`; the last leaderless error is raised once that is spent."""
    deadline = time.monotonic() + OUTAGE_RETRY_S
    delay = 0.1
    while True:
        try:
            return await operation()
        except LEADERLESS_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("%s: no answer from the stream (%s): trying again in %.1f s", what, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
