"""What the services' cores need of the outside world, as ports they are handed.

A core publishes events through a `Publisher` and keeps records in a `VersionedStore` without
knowing NATS: the composition roots (`services/*/app.py`) pass the bus (`llmos.bus.broker.Bus`,
`Bus.bucket`), unit tests the in-memory stand-ins of `llmos.testing`. Both speak the platform's
errors (`llmos.errors`), so a core handles a missing record or a lost race the same way on each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message

from llmos.errors import FailedPrecondition, NotFound, Unavailable

T = TypeVar("T")


class Publisher(Protocol):
    """Sends events to the bus (`Bus.publish`), or records them in a test."""

    async def publish(self, subject: str, message: Message, msg_id: str | None = None) -> None:
        """`msg_id` (default: a hash of the content) lets the bus drop a duplicate publish."""


@dataclass(frozen=True)
class Versioned(Generic[T]):
    """A stored value and the revision it was written at, to compare-and-set against."""

    value: T
    revision: int


class Bucket(Protocol):
    """Byte values under keys, every write numbered by a revision.

    `get` raises NotFound for an absent key; `create` (key taken) and `update` (the key was
    written since `revision`) raise FailedPrecondition; a store that cannot be reached raises
    Unavailable.
    """

    async def get(self, key: str) -> Versioned[bytes]: ...

    async def put(self, key: str, value: bytes) -> int: ...

    async def create(self, key: str, value: bytes) -> int: ...

    async def update(self, key: str, value: bytes, revision: int) -> int: ...

    async def delete(self, key: str) -> None: ...


class Sealing(Protocol):
    """Encryption at rest (`llmos.crypto.AtRest`); the associated data binds a record to its key."""

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes: ...

    def open(self, record: bytes, associated_data: bytes) -> bytes: ...


def tenant_key(tenant: str, name: str) -> str:
    """The bucket key of a tenant's record: keys allow a restricted alphabet while names are free
    text, and the tenant is part of the hash so one tenant never reads another's record."""
    return hashlib.sha256(f"{tenant}\x00{name}".encode()).hexdigest()


class VersionedStore(Generic[T]):
    """Each tenant's records of one kind in a bucket, encoded (and sealed) on the way in.

    Writers that read, modify and write race each other across requests and replicas: `change`
    makes that one compare-and-set on the revision, reading again whenever another writer won.
    """

    def __init__(
        self,
        bucket: Bucket,
        encode: Callable[[T], bytes],
        decode: Callable[[bytes], T],
        record: str,
        sealing: Sealing | None = None,
        stamp: Callable[[T], None] | None = None,
    ) -> None:
        self._bucket = bucket
        self._encode = encode
        self._decode = decode
        self._record = record  # what a record is, for messages: "profile of user"
        self._sealing = sealing
        self._stamp = stamp  # marks a value as it is written, e.g. its `updated_at`

    def _stored(self, key: str, value: T) -> bytes:
        if self._stamp:
            self._stamp(value)
        data = self._encode(value)
        return self._sealing.seal(data, key.encode()) if self._sealing else data

    async def get(self, tenant: str, name: str) -> Versioned[T] | None:
        key = tenant_key(tenant, name)
        try:
            entry = await self._bucket.get(key)
        except NotFound:
            return None
        data = self._sealing.open(entry.value, key.encode()) if self._sealing else entry.value
        return Versioned(self._decode(data), entry.revision)

    async def put(self, tenant: str, name: str, value: T) -> int:
        """Write whatever is stored; the new revision."""
        key = tenant_key(tenant, name)
        return await self._bucket.put(key, self._stored(key, value))

    async def create(self, tenant: str, name: str, value: T) -> int:
        key = tenant_key(tenant, name)
        return await self._bucket.create(key, self._stored(key, value))

    async def update(self, tenant: str, name: str, value: T, revision: int) -> int:
        key = tenant_key(tenant, name)
        return await self._bucket.update(key, self._stored(key, value), revision)

    async def delete(self, tenant: str, name: str) -> None:
        await self._bucket.delete(tenant_key(tenant, name))

    async def change(
        self,
        tenant: str,
        name: str,
        apply: Callable[[T], bool],
        attempts: int = 10,
        missing: Callable[[], T] | None = None,
    ) -> bool:
        """Apply `apply` (False: leave the record alone) atomically; whether it wrote.

        An absent record starts as `missing()`, or stays absent without it.
        """
        key = tenant_key(tenant, name)
        for _ in range(attempts):
            current = await self.get(tenant, name)
            if current is not None:
                value = current.value
            elif missing is not None:
                value = missing()
            else:
                return False
            if not apply(value):
                return False
            data = self._stored(key, value)
            try:
                if current is None:
                    await self._bucket.create(key, data)
                else:
                    await self._bucket.update(key, data, current.revision)
                return True
            except FailedPrecondition:
                continue
        raise Unavailable(f"{self._record} {name!r} kept changing under {attempts} attempts")
