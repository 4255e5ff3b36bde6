"""In-memory stand-ins for the ports (`llmos.ports`), for unit tests and in-process benchmarks."""

from __future__ import annotations

from google.protobuf.message import Message

from llmos.errors import FailedPrecondition, NotFound
from llmos.ports import Versioned


class MemoryPublisher:
    """Keeps every published event, in order, as (subject, message)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Message]] = []

    async def publish(self, subject: str, message: Message, msg_id: str | None = None) -> None:
        self.published.append((subject, message))


class MemoryBucket:
    """A KV bucket in a dict with JetStream's revisions: one counter for the bucket, `create`
    refuses a taken key and `update` a revision that is not the key's latest."""

    def __init__(self) -> None:
        self.entries: dict[str, Versioned[bytes]] = {}
        self._revision = 0

    def _write(self, key: str, value: bytes) -> int:
        self._revision += 1
        self.entries[key] = Versioned(value, self._revision)
        return self._revision

    async def get(self, key: str) -> Versioned[bytes]:
        if key not in self.entries:
            raise NotFound(f"no key {key!r}")
        return self.entries[key]

    async def put(self, key: str, value: bytes) -> int:
        return self._write(key, value)

    async def create(self, key: str, value: bytes) -> int:
        if key in self.entries:
            raise FailedPrecondition(f"key {key!r} exists")
        return self._write(key, value)

    async def update(self, key: str, value: bytes, revision: int) -> int:
        current = self.entries.get(key)
        if current is None or current.revision != revision:
            raise FailedPrecondition(f"key {key!r} was written since revision {revision}")
        return self._write(key, value)

    async def delete(self, key: str) -> None:
        self.entries.pop(key, None)
