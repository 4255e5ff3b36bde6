"""llmos.users: users act as themselves; operators and administrators act for the tenant's users."""

from __future__ import annotations

import pytest

from llmos.auth import Principal
from llmos.errors import PermissionDenied
from llmos.users import acting_user, check_owner

pytestmark = pytest.mark.unit

ALICE = Principal("alice", "acme", frozenset({"user"}))
OPERATOR = Principal("olga", "acme", frozenset({"operator"}))
ADMIN = Principal("root", "acme", frozenset({"admin"}))
SERVICE = Principal("dialogue", "acme", frozenset({"service"}))


def test_a_user_acts_as_itself_only() -> None:
    assert acting_user(ALICE, "") == acting_user(ALICE, "alice") == "alice"
    with pytest.raises(PermissionDenied, match="'alice' may act only as itself, not as user 'bob'"):
        acting_user(ALICE, "bob")
    with pytest.raises(PermissionDenied):
        acting_user(SERVICE, "bob")  # a service acts for bus events' tenants, not for users


def test_operators_and_administrators_act_for_other_users() -> None:
    assert acting_user(OPERATOR, "bob") == acting_user(ADMIN, "bob") == "bob"
    assert acting_user(OPERATOR, "") == "olga"


def test_only_the_owner_operators_and_administrators_pass_the_owner_check() -> None:
    check_owner(ALICE, "alice", "session 's1'")
    check_owner(OPERATOR, "alice", "session 's1'")
    check_owner(ADMIN, "", "session 's1'")
    for owner in ("bob", ""):
        with pytest.raises(PermissionDenied, match="session 's1' belongs to another user"):
            check_owner(ALICE, owner, "session 's1'")
