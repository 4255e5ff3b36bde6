"""JetStream KV buckets behind the `llmos.ports.Bucket` port.

nats.js errors stop here: the services see the platform's NotFound, FailedPrecondition and
Unavailable, and never import nats.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from nats.errors import ConnectionClosedError, NoRespondersError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, ServiceUnavailableError
from nats.js.kv import KeyValue

from llmos.errors import FailedPrecondition, NotFound, Unavailable
from llmos.ports import Versioned


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
        except (TimeoutError, ConnectionClosedError, NoRespondersError, ServiceUnavailableError) as exc:
            raise Unavailable(f"bucket {self.name!r} cannot be reached: {exc!r}") from exc

    async def get(self, key: str) -> Versioned[bytes]:
        with self._platform_errors(key):
            entry = await (await self._open()).get(key)
        return Versioned(entry.value or b"", entry.revision or 0)

    async def put(self, key: str, value: bytes) -> int:
        with self._platform_errors(key):
            return await (await self._open()).put(key, value)

    async def create(self, key: str, value: bytes) -> int:
        with self._platform_errors(key):
            return await (await self._open()).create(key, value)

    async def update(self, key: str, value: bytes, revision: int) -> int:
        with self._platform_errors(key):
            return await (await self._open()).update(key, value, last=revision)

    async def delete(self, key: str) -> None:
        with self._platform_errors(key):
            await (await self._open()).delete(key)
