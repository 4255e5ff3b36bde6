"""The compose deployment's NATS users are natsauth's: deploy/nats/authorization.conf is generated
from the one permission table, and each compose service connects as its own user with only its
own password. The table itself matches what each service's handlers consume."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

import pytest
import yaml

from llmos.bus import subjects as subjects_module
from llmos.natsauth import (
    ADMIN_USER,
    BUS_USERS,
    COMPOSE_AUTHORIZATION,
    GRANTS,
    compose_authorization,
    password_variable,
    permissions,
)
from tests.unit.test_compose import COMPOSE_FILE, ROOT, mounts

pytestmark = pytest.mark.unit

USERS = (ADMIN_USER, *BUS_USERS)
JETSTREAM_KEY_VARIABLE = "LLMOS_JETSTREAM_KEY"


def configured_users() -> dict[str, dict[str, Any]]:
    """authorization.conf's users, read back (password references become "$NAME" strings)."""
    text = COMPOSE_AUTHORIZATION.read_text()
    body = text[text.index("users = ") + len("users = "):text.rindex("}")]
    users = json.loads(re.sub(r"\$(LLMOS_NATS_[A-Z]+_PASSWORD)\b", r'"$\1"', body))
    return {user["user"]: user for user in users}


@pytest.fixture(scope="module")
def raw_services() -> dict[str, dict[str, Any]]:
    """Compose services before interpolation: what each container's environment refers to."""
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def test_authorization_conf_is_generated_from_natsauth() -> None:
    assert COMPOSE_AUTHORIZATION.read_text() == compose_authorization(), (
        "deploy/nats/authorization.conf is stale: run python -m llmos.natsauth compose"
    )


def test_each_service_user_has_exactly_natsauths_grants_and_a_password_from_the_environment() -> None:
    users = configured_users()
    assert set(users) == set(USERS)
    for user, entry in users.items():
        assert entry["password"] == f"${password_variable(user)}", user
    assert "permissions" not in users[ADMIN_USER]
    for service in BUS_USERS:
        assert users[service]["permissions"] == permissions(GRANTS[service]), service
        # Nothing beyond the grant: no wildcard over the platform's subjects.
        allowed = users[service]["permissions"]["publish"]["allow"] + users[service]["permissions"]["subscribe"]["allow"]
        assert not {"llmos.>", ">", "llmos.*"} & set(allowed), service


def test_the_nats_container_has_every_password_and_the_jetstream_key(raw_services: dict[str, dict[str, Any]]) -> None:
    nats = raw_services["nats"]
    environment = nats["environment"]
    for variable in (*(password_variable(user) for user in USERS), JETSTREAM_KEY_VARIABLE):
        assert environment[variable].startswith(f"${{{variable}:?"), variable  # required, never a default
    config_dir = {target.rpartition("/")[0] for kind, _, target in mounts(nats) if target.endswith("llmos.conf")}
    assert {target for kind, source, target in mounts(nats) if source.endswith("authorization.conf")} == {
        f"{config_dir.pop()}/authorization.conf"
    }, "authorization.conf must sit next to the config that includes it"


@pytest.mark.parametrize("service", BUS_USERS)
def test_each_service_connects_as_its_own_user_with_only_its_own_password(
    raw_services: dict[str, dict[str, Any]], service: str
) -> None:
    environment = raw_services[service]["environment"]
    assert environment["LLMOS_NATS_USER"] == service
    assert environment["LLMOS_NATS_PASSWORD"].startswith(f"${{{password_variable(service)}:?")
    others = {password_variable(user) for user in USERS} - {password_variable(service)}
    assert not any(other in str(value) for value in environment.values() for other in others)
    assert environment.get(JETSTREAM_KEY_VARIABLE, "") == ""  # nats-server's key, never a service's


def subscribed_subjects(service: str) -> set[str]:
    """The subjects services/<service>/handlers.py builds a Subscription or priority lanes for (read from its source)."""
    tree = ast.parse((ROOT / "services" / service / "handlers.py").read_text())
    subjects = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("Subscription", "priority_lanes") and node.args:
            first = node.args[0]
            subjects.add(getattr(subjects_module, first.id) if isinstance(first, ast.Name) else ast.literal_eval(first))
    return subjects


@pytest.mark.parametrize("service", BUS_USERS)
def test_each_grant_covers_exactly_what_the_service_consumes(service: str) -> None:
    handlers = ROOT / "services" / service / "handlers.py"
    consumed = subscribed_subjects(service) if handlers.exists() else set()
    assert set(GRANTS[service].consume) == consumed, "update GRANTS in libs/llmos/natsauth.py, then python -m llmos.natsauth compose"
