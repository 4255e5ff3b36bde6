"""NATS users with subject permissions: each service may publish and subscribe only where
DESIGN.md says it does.

`llmos up` generates one user per service (random passwords, kept in
`$LLMOS_HOME/run/nats-credentials.json`, mode 0600) plus an `admin` user for the command line,
and writes the `authorization` block into the nats-server configuration. JetStream needs its API
(`$JS.API.>`), acknowledgements (`$JS.ACK.>`) and reply inboxes; KV buckets are reached through
`$KV.<bucket>.>` and only the buckets a service uses are granted. A publish outside a user's
grant is refused by the server with a permissions violation.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats

from llmos.bus.subjects import dead_letter_subject
from llmos.settings import SERVICE_NAMES, PlatformSettings

CREDENTIALS_FILE = "nats-credentials.json"
ADMIN_USER = "admin"
_JETSTREAM = ("$JS.API.>", "$JS.ACK.>")
_INBOX = "_INBOX.>"


@dataclass(frozen=True)
class ServiceGrant:
    publish: tuple[str, ...]
    consume: tuple[str, ...]
    buckets: tuple[str, ...] = ()


def _grant(service: str, publish: tuple[str, ...], consume: tuple[str, ...], buckets: tuple[str, ...] = ()) -> ServiceGrant:
    # Every service audits, and dead-letters what it consumes.
    return ServiceGrant(
        publish=(*publish, f"llmos.audit.{service}", *(dead_letter_subject(subject) for subject in consume)),
        consume=consume,
        buckets=("api_keys", *buckets),
    )


GRANTS: dict[str, ServiceGrant] = {
    "ingest": _grant(
        "ingest",
        ("llmos.chunks.created", "llmos.docs.failed", "llmos.docs.deleted"),
        ("llmos.ingest.requested", "llmos.chunks.embedded", "llmos.docs.indexed"),
        ("document_status",),
    ),
    "tokenizer": _grant("tokenizer", (), ()),
    "inference": _grant("inference", ("llmos.chunks.embedded",), ("llmos.chunks.created",)),
    "retrieval": _grant(
        "retrieval", ("llmos.docs.indexed",), ("llmos.chunks.embedded", "llmos.docs.deleted"), ("user_profiles",)
    ),
    "speech": _grant("speech", ("llmos.speech.>",), ("llmos.docs.indexed", "llmos.docs.deleted")),
    "dialogue": _grant("dialogue", ("llmos.dialogue.>",), ("llmos.docs.indexed",), ("dialogue_sessions",)),
    "audit": _grant("audit", (), ("llmos.audit.>",)),
}
assert set(GRANTS) == set(SERVICE_NAMES)


def permissions(grant: ServiceGrant) -> dict[str, dict[str, list[str]]]:
    kv = [f"$KV.{bucket}.>" for bucket in grant.buckets]
    return {
        "publish": {"allow": [*grant.publish, *_JETSTREAM, *kv]},
        "subscribe": {"allow": [*grant.consume, _INBOX, *kv]},
    }


def new_credentials() -> dict[str, str]:
    return {user: secrets.token_urlsafe(18) for user in (*SERVICE_NAMES, ADMIN_USER)}


def authorization_block(credentials: dict[str, str]) -> str:
    """The `authorization { users = [...] }` block of a nats-server configuration."""
    users = [{"user": ADMIN_USER, "password": credentials[ADMIN_USER]}]
    users += [
        {"user": service, "password": credentials[service], "permissions": permissions(GRANTS[service])}
        for service in SERVICE_NAMES
    ]
    # nats-server's configuration format accepts JSON values.
    return "authorization {\n  users = " + json.dumps(users, indent=2) + "\n}\n"


def write_credentials(path: Path, credentials: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(credentials, handle)


def read_credentials(path: Path) -> dict[str, str] | None:
    return json.loads(path.read_text()) if path.exists() else None


def credentials_path(home: Path) -> Path:
    return home / "run" / CREDENTIALS_FILE


def cli_user(settings: PlatformSettings) -> tuple[str, str]:
    """The NATS user of a command-line tool: its own settings, else the stack's admin user."""
    if settings.nats_user:
        return settings.nats_user, settings.nats_password
    credentials = read_credentials(credentials_path(settings.home))
    return (ADMIN_USER, credentials[ADMIN_USER]) if credentials else ("", "")


async def connect_cli(settings: PlatformSettings, **options: Any) -> nats.NATS:
    user, password = cli_user(settings)
    if user:
        options.update(user=user, password=password)
    return await nats.connect(settings.nats_url, **options)
