"""JetStream KV buckets behind the `llmos.ports.Bucket` port.

nats.js errors stop here: the services see the platform's NotFound, FailedPrecondition and
Unavailable, and never import nats. A bucket without a leader is waited for (llmos.bus.outage)
before it counts as unavailable. A write retried after its acknowledgement was lost can find
its own write: a compare-and-set then fails as written since read, which callers already
handle by reading again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from nats.errors import ConnectionClosedError, NoRespondersError
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from llmos.bus.outage import while_leaderless
from llmos.errors import FailedPrecondition, NotFound, Unavailable
from llmos.ports import Versioned

T = TypeVar("T")


class NatsBucket:
    """One JetStream KV bucket, opened on first use: services are built before the bus connects."""

    def __init__(self, name: str, open_bucket: Callable[[], Awaitable[KeyValue]]) -> None:
        self.name = name
        self._open = open_bucket

    @contextmanager
    def _platform_errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except KeyNotFoundError:  # also a deleted or purged key
            raise NotFound(f"no key {key!r} in bucket {self.name!r}") from None
        except KeyWrongLastSequenceError:
            raise FailedPrecondition(f"key {key!r} in bucket {self.name!r} was written since it was read") from None
        # nats' TimeoutError is the built-in one's subclass.
        except (TimeoutError, ConnectionClosedError, NoRespondersError, NoStreamResponseError, ServiceUnavailableError) as exc:
            raise Unavailable(f"bucket {self.name!r} cannot be reached: {exc!r}") from exc

    async def _call(self, key: str, operation: Callable[[KeyValue], Awaitable[T]]) -> T:
        with self._platform_errors(key):
            bucket = await self._open()
            return await while_leaderless(lambda: operation(bucket), f"bucket {self.name!r}, key {key!r}")

    async def get(self, key: str) -> Versioned[bytes]:
        entry = await self._call(key, lambda bucket: bucket.get(key))
        return Versioned(entry.value or b"", entry.revision or 0)

    async def put(self, key: str, value: bytes) -> int:
        return await self._call(key, lambda bucket: bucket.put(key, value))

    async def create(self, key: str, value: bytes) -> int:
        return await self._call(key, lambda bucket: bucket.create(key, value))

    async def update(self, key: str, value: bytes, revision: int) -> int:
        return await self._call(key, lambda bucket: bucket.update(key, value, last=revision))

    async def delete(self, key: str) -> None:
        await self._call(key, lambda bucket: bucket.delete(key))
