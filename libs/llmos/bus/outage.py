"""Riding out outages that last seconds: a JetStream stream without a leader, a replica restarting.

A cluster node lost, an election under way: for seconds on a loaded machine a stream (a KV
bucket is one) answers no publish, and NATS says so as "no responders", "no response from
stream" or a timeout. Writing again with the same message id (which JetStream deduplicates), or
the same compare-and-set, is safe, so the bus and the KV buckets retry for up to
`OUTAGE_RETRY_S`. Likewise a bus handler whose dependency is UNAVAILABLE (every replica of a
service restarting) is run again within the same delivery. Otherwise an outage spends the
message's deliveries (three pass in 2.5 s) and dead-letters its document (issue 16, item 3).
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


async def retry_through(
    operation: Callable[[], Awaitable[T]],
    what: str,
    transient: tuple[type[BaseException], ...] = LEADERLESS_ERRORS,
    waiting: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """Run `operation`, again after a back-off while it fails with a `transient` error, for up to
    `OUTAGE_RETRY_S`; the last such error is raised once that is spent. `waiting` is awaited
    before each back-off (a handler tells the server its message is still in progress)."""
    deadline = time.monotonic() + OUTAGE_RETRY_S
    delay = 0.1
    while True:
        try:
            return await operation()
        except transient as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("%s: %s: trying again in %.1f s", what, type(exc).__name__, delay)
            if waiting is not None:
                await waiting()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def while_leaderless(operation: Callable[[], Awaitable[T]], what: str) -> T:
    """`operation` retried while the stream it writes to has no leader."""
    return await retry_through(operation, what)
