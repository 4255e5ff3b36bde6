"""Per-user reading profiles for Recommend, in the `user_profiles` JetStream KV bucket.

A profile lists the documents a user read (GetDocument with a user id) and the documents their
searches surfaced (Search with a user id), most recent first and capped. It lives in KV so
every replica sees it and it survives restarts; writes are compare-and-set on the revision.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from llmos.errors import Unavailable

PROFILES_BUCKET = "user_profiles"


@dataclass
class Profile:
    read: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)

    def seen(self) -> list[str]:
        return list(dict.fromkeys([*self.read, *self.asked]))


def _remember(items: list[str], new: Sequence[str], cap: int) -> list[str]:
    return list(dict.fromkeys([*new, *items]))[:cap]


class ProfileStore(Protocol):
    async def get(self, tenant: str, user_id: str) -> Profile: ...
    async def record_read(self, tenant: str, user_id: str, document_id: str) -> None: ...
    async def record_asked(self, tenant: str, user_id: str, document_ids: Sequence[str]) -> None: ...


class KvProfileStore:
    def __init__(self, bucket: Callable[[], Awaitable[KeyValue]], cap: int) -> None:
        self._bucket = bucket  # the bucket is opened once the bus runs
        self.cap = cap

    @staticmethod
    def _key(tenant: str, user_id: str) -> str:
        return hashlib.sha256(f"{tenant}\x00{user_id}".encode()).hexdigest()

    async def _entry(self, tenant: str, user_id: str) -> tuple[Profile, int | None]:
        bucket = await self._bucket()
        try:
            entry = await bucket.get(self._key(tenant, user_id))
        except KeyNotFoundError:
            return Profile(), None
        if not entry.value:
            return Profile(), entry.revision
        data = json.loads(entry.value)
        return Profile(read=list(data.get("read", [])), asked=list(data.get("asked", []))), entry.revision

    async def get(self, tenant: str, user_id: str) -> Profile:
        return (await self._entry(tenant, user_id))[0]

    async def change(self, tenant: str, user_id: str, update: Callable[[Profile], None], attempts: int = 10) -> None:
        bucket = await self._bucket()
        key = self._key(tenant, user_id)
        for _ in range(attempts):
            profile, revision = await self._entry(tenant, user_id)
            update(profile)
            value = json.dumps({"read": profile.read, "asked": profile.asked}).encode()
            try:
                if revision is None:
                    await bucket.create(key, value)
                else:
                    await bucket.update(key, value, last=revision)
                return
            except KeyWrongLastSequenceError:
                continue
        raise Unavailable(f"profile of user {user_id!r} kept changing under {attempts} attempts")

    async def record_read(self, tenant: str, user_id: str, document_id: str) -> None:
        def update(profile: Profile) -> None:
            profile.read = _remember(profile.read, [document_id], self.cap)

        await self.change(tenant, user_id, update)

    async def record_asked(self, tenant: str, user_id: str, document_ids: Sequence[str]) -> None:
        def update(profile: Profile) -> None:
            profile.asked = _remember(profile.asked, document_ids, self.cap)

        await self.change(tenant, user_id, update)
