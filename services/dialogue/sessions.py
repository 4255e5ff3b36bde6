"""Dialogue sessions in the `dialogue_sessions` JetStream KV bucket.

State survives a restart of the service and is shared by its replicas. A session untouched for
longer than the idle TTL is treated as gone (and deleted); the bucket drops entries older than
its own TTL regardless. Writes are compare-and-set on the entry's revision, so two turns racing on
one session cannot silently overwrite each other.

Entries are sealed with AES-GCM (`llmos.crypto.AtRest`): the KV holds the key id, nonce and
ciphertext only, and the entry's key is the associated data, so an entry copied under another
session's key fails to open.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from llmos.bus.broker import Bus
from llmos.crypto import AtRest
from llmos.errors import FailedPrecondition, NotFound
from llmos.v1 import dialogue_pb2

SESSIONS_BUCKET = "dialogue_sessions"


@dataclass
class StoredSession:
    session: dialogue_pb2.Session
    revision: int  # 0: not stored yet


class SessionStore:
    def __init__(self, bus: Bus, idle_ttl_s: float, at_rest: AtRest) -> None:
        self._bus = bus
        self._idle_ttl_s = idle_ttl_s
        self._at_rest = at_rest

    @staticmethod
    def _key(tenant: str, session_id: str) -> str:
        # KV keys have a restricted alphabet; session ids are caller-chosen text.
        return hashlib.sha256(f"{tenant}\x00{session_id}".encode()).hexdigest()

    async def get(self, tenant: str, session_id: str) -> StoredSession:
        bucket = await self._bus.key_value(SESSIONS_BUCKET)
        key = self._key(tenant, session_id)
        try:
            entry = await bucket.get(key)
        except KeyNotFoundError:
            raise NotFound(f"no session {session_id!r} in tenant {tenant!r} (it may have expired)") from None
        session = dialogue_pb2.Session.FromString(self._at_rest.open(entry.value or b"", key.encode()))
        if time.time() - session.updated_at.ToSeconds() > self._idle_ttl_s:
            await bucket.delete(key)
            raise NotFound(f"session {session_id!r} expired after {self._idle_ttl_s:.0f} s idle; start a new one")
        return StoredSession(session, entry.revision or 0)

    async def put(self, stored: StoredSession) -> None:
        stored.session.updated_at.GetCurrentTime()
        bucket = await self._bus.key_value(SESSIONS_BUCKET)
        key = self._key(stored.session.tenant, stored.session.session_id)
        value = self._at_rest.seal(stored.session.SerializeToString(), key.encode())
        try:
            if stored.revision:
                stored.revision = await bucket.update(key, value, last=stored.revision)
            else:
                stored.revision = await bucket.create(key, value)
        except KeyWrongLastSequenceError:
            raise FailedPrecondition(
                f"session {stored.session.session_id!r} was changed by another request meanwhile; send the message again"
            ) from None

    async def delete(self, tenant: str, session_id: str) -> None:
        await self.get(tenant, session_id)
        bucket = await self._bus.key_value(SESSIONS_BUCKET)
        await bucket.delete(self._key(tenant, session_id))
