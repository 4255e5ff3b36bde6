"""Who is calling: principals and the identity context of the request being served.

A client's RPC carries `authorization: Bearer <api key>`; a call one service makes to another
carries `authorization: Service <assertion>`, a short-lived statement signed by the calling
service naming the principal it acts for (`llmos.assertions`). API keys are never forwarded.
The gRPC server resolves either to a `Principal` (`llmos.keys`) before the servicer runs and
keeps it in a context variable, so core logic asks `current_principal()` instead of trusting a
tenant named in the request, and the calls it makes in turn act for the same principal.

Tenant names are one alphabet everywhere a tenant is created (keys, static keys, principals,
assertions): 1 to 63 lower-case letters, digits, '-' and '_', starting with a letter or digit.
No separator ('/', ':', '.', ',', '|', '=', space, NUL) nor NATS wildcard can be part of one, so a
tenant is safe as one part of an id, a subject token or a key, and two tenants never differ only
by case.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from llmos.errors import InvalidArgument, PermissionDenied, Unauthenticated

AUTHORIZATION_HEADER = "authorization"
# The role of a service acting on its own behalf for a bus event's tenant. It exists only inside a
# service assertion: no API key carries it.
SERVICE_ROLE = "service"

TENANT_MAX_CHARS = 63
TENANT_ALPHABET = "1 to 63 lower-case letters, digits, '-' and '_', starting with a letter or digit"
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# How much of a rejected name an error message quotes.
_QUOTED_CHARS = 80


def check_tenant(tenant: str, field_name: str = "tenant") -> str:
    """`tenant` when it is a tenant name, else InvalidArgument naming the alphabet."""
    if _TENANT.fullmatch(tenant):
        return tenant
    if not tenant:
        raise InvalidArgument(field_name, f"is required: a tenant name is {TENANT_ALPHABET}")
    quoted = repr(tenant[:_QUOTED_CHARS]) + ("…" if len(tenant) > _QUOTED_CHARS else "")
    raise InvalidArgument(
        field_name,
        f"{quoted} is not a tenant name: use {TENANT_ALPHABET} (no separators such as '/', ':', '.', ',' or spaces)",
    )


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a named subject acting within one tenant with some roles.

    `service` names the platform service the call came through (the signer of its assertion);
    it is empty for a client that presented its own API key.
    """

    subject: str
    tenant: str
    roles: frozenset[str] = field(default_factory=frozenset)
    service: str = ""

    def __post_init__(self) -> None:
        check_tenant(self.tenant)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def acts_across_tenants(self) -> bool:
        """Only administrators. A service acting on a bus event names the event's tenant as its
        own (`event_principal`), so it has no right beyond that tenant."""
        return self.is_admin


def event_principal(subject: str, tenant: str) -> Principal:
    """The principal of a bus handler acting on an event of `tenant` received on `subject`:
    calls it makes to other services act for that tenant only."""
    return Principal(f"bus:{subject}", tenant, frozenset({SERVICE_ROLE}))


_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "llmos_principal", default=None
)


def current_principal() -> Principal:
    """The principal of the request being served; raises when there is none."""
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated(
            "no authenticated principal: a service calls another only while serving a caller "
            "or acting on a bus event's tenant (llmos.auth.event_principal)"
        )
    return principal


@contextmanager
def acting_as(principal: Principal) -> Iterator[None]:
    """Run a block as `principal` (the gRPC server does this around every call, a bus handler
    around the work it does for an event's tenant)."""
    token = _principal.set(principal)
    try:
        yield
    finally:
        _principal.reset(token)


def effective_tenant(requested: str) -> str:
    """The tenant a request acts on: the caller's own, or another one for administrators.

    A tenant named in the request is never trusted by itself: only an administrator may name a
    tenant other than the principal's own.
    """
    principal = current_principal()
    if not requested or requested == principal.tenant:
        return principal.tenant
    check_tenant(requested)
    if principal.acts_across_tenants:
        return requested
    raise PermissionDenied(
        f"principal {principal.subject!r} of tenant {principal.tenant!r} may not act on tenant "
        f"{requested!r}; only administrators act across tenants"
    )
