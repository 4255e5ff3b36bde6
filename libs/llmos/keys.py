"""API keys: issued once, stored only as SHA-256 digests in the `api_keys` KV bucket.

A key reads `llmos_<key id>_<secret>`; the key id names it for listing and revocation, the
digest of the whole key finds its principal. Services cache a resolved key for a few seconds,
so a revocation takes effect within `CACHE_TTL_S` everywhere without a restart. Calls between
services carry no API key but a service assertion (`llmos.assertions`), resolved here too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from llmos.assertions import SERVICE_SCHEME, AssertionVerifier
from llmos.auth import SERVICE_ROLE, Principal, check_tenant
from llmos.errors import InvalidArgument, NotFound, Unauthenticated
from llmos.policy import ROLES

KEYS_BUCKET = "api_keys"
KEY_PREFIX = "llmos_"
CACHE_TTL_S = 5.0
_BEARER = "bearer "
_SERVICE = SERVICE_SCHEME.lower() + " "


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    subject: str
    tenant: str
    roles: tuple[str, ...]
    created_at: float

    def principal(self) -> Principal:
        try:
            return Principal(self.subject, self.tenant, frozenset(self.roles))
        except InvalidArgument as exc:
            # Issued before tenant names had an alphabet: the key names no tenant that can exist now.
            raise Unauthenticated(f"API key {self.key_id} is no longer valid ({exc.message}); issue a new one") from None


def check_identity(subject: str, tenant: str, roles: tuple[str, ...]) -> None:
    if not subject:
        raise InvalidArgument("subject", "is required")
    check_tenant(tenant)
    unknown = [role for role in roles if role not in ROLES]
    if not roles or unknown:
        hint = (
            "; services have their own identities (LLMOS_SERVICE_SIGNING_KEYS), no API key is a service's"
            if SERVICE_ROLE in unknown else ""
        )
        raise InvalidArgument(
            "roles", f"give one or more of {', '.join(ROLES)} (unknown: {', '.join(unknown) or 'none given'}){hint}"
        )


class KeyStore:
    """Issued keys in a JetStream KV bucket, shared by every service and replica."""

    def __init__(self, js: JetStreamContext, bucket: KeyValue) -> None:
        self._js = js
        self._bucket = bucket

    @classmethod
    async def open(cls, js: JetStreamContext) -> KeyStore:
        return cls(js, await js.key_value(KEYS_BUCKET))

    async def create(self, subject: str, tenant: str, roles: tuple[str, ...]) -> tuple[ApiKeyRecord, str]:
        """A new key for the principal; the key itself is returned once and never stored."""
        check_identity(subject, tenant, roles)
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
        record = ApiKeyRecord(key_id, subject, tenant, tuple(sorted(roles)), time.time())
        await self._bucket.create(key_digest(key), json.dumps(asdict(record)).encode())
        return record, key

    async def lookup(self, key: str) -> ApiKeyRecord | None:
        return await self._record(key_digest(key))

    async def _record(self, digest: str) -> ApiKeyRecord | None:
        try:
            entry = await self._bucket.get(digest)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        data = json.loads(entry.value)
        return ApiKeyRecord(**{**data, "roles": tuple(data["roles"])})

    async def records(self) -> list[tuple[str, ApiKeyRecord]]:
        # The stream's per-subject state lists every digest ever written. nats-py's
        # KeyValue.keys() can return before its watcher has delivered anything, which
        # made a revocation miss a key that `list` had just shown.
        prefix = f"$KV.{KEYS_BUCKET}."
        info = await self._js.stream_info(f"KV_{KEYS_BUCKET}", subjects_filter=f"{prefix}>")
        found = []
        for digest in (subject[len(prefix):] for subject in info.state.subjects or {}):
            record = await self._record(digest)
            if record is not None:
                found.append((digest, record))
        return sorted(found, key=lambda item: item[1].created_at)

    async def revoke(self, key_id: str) -> ApiKeyRecord:
        for digest, record in await self.records():
            if record.key_id == key_id:
                await self._bucket.purge(digest)
                return record
        raise NotFound(f"no key with id {key_id!r}")


def parse_static_keys(spec: str) -> dict[str, Principal]:
    """`LLMOS_API_KEYS`: comma-separated `key=subject:tenant:role|role`, kept as digests."""
    keys: dict[str, Principal] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, identity = entry.partition("=")
        parts = identity.split(":")
        if not sep or not key or len(parts) != 3:
            raise InvalidArgument("LLMOS_API_KEYS", f"entry {key[:4]}… is not key=subject:tenant:role|role")
        subject, tenant, roles = parts
        role_tuple = tuple(filter(None, roles.split("|")))
        try:
            check_identity(subject, tenant, role_tuple)
        except InvalidArgument as exc:
            raise InvalidArgument("LLMOS_API_KEYS", f"entry of {subject!r}: {exc.message}") from None
        keys[key_digest(key)] = Principal(subject, tenant, frozenset(role_tuple))
    return keys


class KeyAuthenticator:
    """Resolves `authorization: Bearer <key>` against static keys, then the key store, and
    `authorization: Service <assertion>` (a call from another service) with `assertions`."""

    def __init__(
        self, static_keys: dict[str, Principal], store: KeyStore | None = None, assertions: AssertionVerifier | None = None
    ) -> None:
        self._static = static_keys
        self._store = store
        self._assertions = assertions
        self._cache: dict[str, tuple[float, Principal]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <api key>'")
        if authorization.lower().startswith(_SERVICE):
            if self._assertions is None:
                raise Unauthenticated("this service accepts no service assertions; send 'authorization: Bearer <api key>'")
            return self._assertions.verify(authorization[len(_SERVICE):].strip())
        if not authorization.lower().startswith(_BEARER):
            raise Unauthenticated("authorization metadata must be 'Bearer <api key>' (or 'Service <assertion>' between services)")
        key = authorization[len(_BEARER):].strip()
        digest = key_digest(key)
        for known, principal in self._static.items():
            if hmac.compare_digest(known, digest):
                return principal
        cached = self._cache.get(digest)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        record = await self._store.lookup(key) if self._store and key.startswith(KEY_PREFIX) else None
        if record is None:
            self._cache.pop(digest, None)
            raise Unauthenticated("unknown or revoked API key")
        principal = record.principal()
        self._cache[digest] = (time.monotonic() + CACHE_TTL_S, principal)
        return principal
