"""Who is calling: principals, API-key authentication and the request's identity context.

Every RPC carries `authorization: Bearer <api key>` metadata. The gRPC server resolves it to a
`Principal` before the servicer runs and keeps it in a context variable, so core logic asks
`current_principal()` instead of trusting a tenant named in the request. Outgoing calls made
while serving a request forward the caller's credentials, so the next service sees the same
principal.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from llmos.errors import InvalidArgument, PermissionDenied, Unauthenticated

AUTHORIZATION_HEADER = "authorization"
_BEARER = "bearer "


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a named subject acting within one tenant with some roles."""

    subject: str
    tenant: str
    roles: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "llmos_principal", default=None
)
_credentials: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "llmos_credentials", default=None
)


def current_principal() -> Principal:
    """The principal of the request being served; raises when there is none."""
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated("no authenticated principal for this request")
    return principal


def current_credentials() -> str | None:
    """The caller's `authorization` value, forwarded on calls made on its behalf."""
    return _credentials.get()


@contextmanager
def acting_as(principal: Principal, credentials: str | None) -> Iterator[None]:
    """Run a block as `principal` (the gRPC server does this around every call)."""
    principal_token = _principal.set(principal)
    credentials_token = _credentials.set(credentials)
    try:
        yield
    finally:
        _principal.reset(principal_token)
        _credentials.reset(credentials_token)


def effective_tenant(requested: str) -> str:
    """The tenant a request acts on: the caller's own, or another one for administrators.

    A tenant named in the request is never trusted by itself: only an administrator may name a
    tenant other than its own.
    """
    principal = current_principal()
    if not requested or requested == principal.tenant:
        return principal.tenant
    if principal.is_admin:
        return requested
    raise PermissionDenied(
        f"principal {principal.subject!r} of tenant {principal.tenant!r} may not act on tenant "
        f"{requested!r}; only administrators act across tenants"
    )


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class ApiKeyAuthenticator:
    """Resolves bearer API keys to principals.

    Keys come from `LLMOS_API_KEYS` as comma-separated `key=subject:tenant:role|role` entries and
    are kept only as SHA-256 digests, compared in constant time.
    """

    def __init__(self, keys: dict[bytes, Principal]) -> None:
        self._keys = keys

    @classmethod
    def from_spec(cls, spec: str) -> ApiKeyAuthenticator:
        keys: dict[bytes, Principal] = {}
        for entry in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, identity = entry.partition("=")
            parts = identity.split(":")
            if not sep or not key or len(parts) != 3 or not parts[0] or not parts[1]:
                raise InvalidArgument(
                    "LLMOS_API_KEYS", f"entry {entry.split('=')[0][:4]}… is not key=subject:tenant:roles"
                )
            subject, tenant, roles = parts
            keys[_digest(key)] = Principal(subject, tenant, frozenset(filter(None, roles.split("|"))))
        return cls(keys)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated(
                "missing credentials: send metadata 'authorization: Bearer <api key>'"
            )
        if not authorization.lower().startswith(_BEARER):
            raise Unauthenticated("authorization metadata must be 'Bearer <api key>'")
        presented = _digest(authorization[len(_BEARER):].strip())
        for digest, principal in self._keys.items():
            if hmac.compare_digest(digest, presented):
                return principal
        raise Unauthenticated("unknown or revoked API key")
