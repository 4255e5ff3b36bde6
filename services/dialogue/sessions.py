"""Dialogue sessions in the `dialogue_sessions` JetStream KV bucket.

State survives a restart of the service and is shared by its replicas. A session untouched for
longer than the idle TTL is treated as gone (and deleted); the bucket drops entries older than
its own TTL regardless. Writes are compare-and-set on the entry's revision, so two turns racing on
one session cannot silently overwrite each other.

A session belongs to the user who started it (`Session.user_id`, the caller's subject, or the
customer an operator named); the dialogue core lets only that user, operators and administrators
read, continue or end it.

Entries are sealed with AES-GCM (`llmos.crypto.AtRest`): the KV holds the key id, nonce and
ciphertext only, and the entry's key is the associated data, so an entry copied under another
session's key fails to open.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from llmos.errors import FailedPrecondition, NotFound
from llmos.ports import Bucket, Sealing, VersionedStore
from llmos.v1 import dialogue_pb2

SESSIONS_BUCKET = "dialogue_sessions"


@dataclass
class StoredSession:
    session: dialogue_pb2.Session
    revision: int  # 0: not stored yet


class SessionStore:
    def __init__(self, bucket: Bucket, idle_ttl_s: float, at_rest: Sealing) -> None:
        self._records = VersionedStore(
            bucket,
            dialogue_pb2.Session.SerializeToString,
            dialogue_pb2.Session.FromString,
            "session",
            sealing=at_rest,
            stamp=lambda session: session.updated_at.GetCurrentTime(),
        )
        self._idle_ttl_s = idle_ttl_s

    async def get(self, tenant: str, session_id: str) -> StoredSession:
        stored = await self._records.get(tenant, session_id)
        if stored is None:
            raise NotFound(f"no session {session_id!r} in tenant {tenant!r} (it may have expired)")
        if time.time() - stored.value.updated_at.ToSeconds() > self._idle_ttl_s:
            await self._records.delete(tenant, session_id)
            raise NotFound(f"session {session_id!r} expired after {self._idle_ttl_s:.0f} s idle; start a new one")
        return StoredSession(stored.value, stored.revision)

    async def put(self, stored: StoredSession) -> None:
        session = stored.session
        try:
            if stored.revision:
                stored.revision = await self._records.update(session.tenant, session.session_id, session, stored.revision)
            else:
                stored.revision = await self._records.create(session.tenant, session.session_id, session)
        except FailedPrecondition:
            raise FailedPrecondition(
                f"session {session.session_id!r} was changed by another request meanwhile; send the message again"
            ) from None

    async def delete(self, tenant: str, session_id: str) -> None:
        await self.get(tenant, session_id)
        await self._records.delete(tenant, session_id)
