"""Who is calling: principals and the identity context of the request being served.

Every RPC carries `authorization: Bearer <api key>` metadata. The gRPC server resolves it to a
`Principal` (see `llmos.keys`) before the servicer runs and keeps it in a context variable, so core logic asks
`current_principal()` instead of trusting a tenant named in the request. Outgoing calls made
while serving a request forward the caller's credentials, so the next service sees the same
principal.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from llmos.errors import PermissionDenied, Unauthenticated

AUTHORIZATION_HEADER = "authorization"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a named subject acting within one tenant with some roles."""

    subject: str
    tenant: str
    roles: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def acts_across_tenants(self) -> bool:
        """Administrators, and services acting on a bus event for the event's tenant."""
        return self.is_admin or "service" in self.roles


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

    A tenant named in the request is never trusted by itself: only an administrator (or a
    service, acting for the tenant of a bus event) may name a tenant other than its own.
    """
    principal = current_principal()
    if not requested or requested == principal.tenant:
        return principal.tenant
    if principal.acts_across_tenants:
        return requested
    raise PermissionDenied(
        f"principal {principal.subject!r} of tenant {principal.tenant!r} may not act on tenant "
        f"{requested!r}; only administrators act across tenants"
    )
