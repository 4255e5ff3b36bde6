"""Which user of a tenant a request acts for, and who may touch what belongs to a user.

Requests name users (`user_id` of Chat, Converse, Search, Recommend, GetDocument) and touch
things that belong to one (a dialogue session, a reading profile). The tenant alone does not
protect them: every user of a tenant shares it. A caller with the `user` role acts as itself
only, its key's subject being its user id; operators and administrators act for the customers
they serve and may name any user of the tenant (the tenant itself is settled by
`llmos.auth.effective_tenant`).
"""

from __future__ import annotations

from llmos.auth import Principal
from llmos.errors import PermissionDenied

# Roles that act for other users of their tenant: support staff and administrators.
ROLES_ACTING_FOR_OTHER_USERS = frozenset({"operator", "admin"})


def acts_for_other_users(principal: Principal) -> bool:
    return bool(principal.roles & ROLES_ACTING_FOR_OTHER_USERS)


def acting_user(principal: Principal, requested: str) -> str:
    """The user a request acts for: the one it names, which must be the caller itself unless the
    caller is an operator or administrator; the caller's own subject when it names none."""
    if not requested or requested == principal.subject:
        return principal.subject
    if acts_for_other_users(principal):
        return requested
    raise PermissionDenied(
        f"{principal.subject!r} may act only as itself, not as user {requested!r}: leave user_id empty "
        f"or give your own; only operators and administrators act for other users"
    )


def check_owner(principal: Principal, owner: str, what: str) -> None:
    """PermissionDenied unless `principal` is `owner` or may act for other users."""
    if owner == principal.subject or acts_for_other_users(principal):
        return
    raise PermissionDenied(
        f"{what} belongs to another user; only its owner, operators and administrators may use it"
    )
