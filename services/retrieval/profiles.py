"""Per-user reading profiles for Recommend, in the `user_profiles` JetStream KV bucket.

A profile lists the documents a user read (GetDocument with a user id) and the documents their
searches surfaced (Search with a user id), most recent first and capped. It lives in KV so
every replica sees it and it survives restarts; writes are compare-and-set on the revision.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llmos.ports import Bucket, VersionedStore

PROFILES_BUCKET = "user_profiles"


@dataclass
class Profile:
    read: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)

    def seen(self) -> list[str]:
        return list(dict.fromkeys([*self.read, *self.asked]))


def _remember(items: list[str], new: Sequence[str], cap: int) -> list[str]:
    return list(dict.fromkeys([*new, *items]))[:cap]


def _encode(profile: Profile) -> bytes:
    return json.dumps({"read": profile.read, "asked": profile.asked}).encode()


def _decode(data: bytes) -> Profile:
    fields = json.loads(data)
    return Profile(read=list(fields.get("read", [])), asked=list(fields.get("asked", [])))


class ProfileStore(Protocol):
    async def get(self, tenant: str, user_id: str) -> Profile: ...
    async def record_read(self, tenant: str, user_id: str, document_id: str) -> None: ...
    async def record_asked(self, tenant: str, user_id: str, document_ids: Sequence[str]) -> None: ...


class KvProfileStore:
    def __init__(self, bucket: Bucket, cap: int) -> None:
        self._records = VersionedStore(bucket, _encode, _decode, "profile of user")
        self.cap = cap

    async def get(self, tenant: str, user_id: str) -> Profile:
        stored = await self._records.get(tenant, user_id)
        return stored.value if stored else Profile()

    async def record_read(self, tenant: str, user_id: str, document_id: str) -> None:
        def update(profile: Profile) -> bool:
            profile.read = _remember(profile.read, [document_id], self.cap)
            return True

        await self._records.change(tenant, user_id, update, missing=Profile)

    async def record_asked(self, tenant: str, user_id: str, document_ids: Sequence[str]) -> None:
        def update(profile: Profile) -> bool:
            profile.asked = _remember(profile.asked, document_ids, self.cap)
            return True

        await self._records.change(tenant, user_id, update, missing=Profile)
