"""NATS users with subject permissions: each service may publish and subscribe only where
DESIGN.md says it does.

`llmos up` generates one user per service (random passwords, kept in
`$LLMOS_HOME/run/nats-credentials.json`, mode 0600) plus an `admin` user for the command line,
and writes the `authorization` block into the nats-server configuration. A publish outside a
user's grant is refused by the server with a permissions violation.

The JetStream API is granted per stream, because it reaches stored data by other subjects: a
user with `$JS.API.>` could read any stream or bucket (a consumer, a direct get) and delete the
AUDIT stream. A service may look up and declare streams (every service declares the platform's
streams at start), create and pull consumers only on the streams holding what it consumes, and
read and write only its own KV buckets; `api_keys` it may only read. Deleting or purging
streams, and reading messages by sequence, are left to `admin`.

The compose deployment uses the same table: `python -m llmos.natsauth compose` writes
deploy/nats/authorization.conf (passwords as environment references); the env file holding them
is made with every other secret of a deployment by `python -m llmos.secrets compose FILE`
(`python -m llmos.natsauth compose-secrets FILE` does the same).
"""

from __future__ import annotations

import json
import os
import secrets
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats

from llmos.bus.subjects import dead_letter_subject, stream_for
from llmos.settings import SERVICE_NAMES, PlatformSettings

CREDENTIALS_FILE = "nats-credentials.json"
ADMIN_USER = "admin"
# Declaring streams and buckets at start: look up and create what is missing. Never update,
# delete or purge: a compromised service could otherwise shorten AUDIT's retention. Bringing
# existing streams to a new version's configuration is the admin's (`llmos up`).
_DECLARE = ("$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.API.STREAM.CREATE.*")
_INBOX = "_INBOX.>"


@dataclass(frozen=True)
class ServiceGrant:
    publish: tuple[str, ...]
    consume: tuple[str, ...]
    buckets: tuple[str, ...] = ()  # read and write
    read_buckets: tuple[str, ...] = ()

    @property
    def consumed_streams(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(stream_for(subject).name for subject in self.consume))


def _grant(service: str, publish: tuple[str, ...], consume: tuple[str, ...], buckets: tuple[str, ...] = ()) -> ServiceGrant:
    # Every service audits, dead-letters what it consumes and checks API keys.
    return ServiceGrant(
        publish=(*publish, f"llmos.audit.{service}", *(dead_letter_subject(subject) for subject in consume)),
        consume=consume,
        buckets=buckets,
        read_buckets=("api_keys",),
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
    "dialogue": _grant(
        "dialogue", ("llmos.dialogue.>",), ("llmos.docs.indexed", "llmos.docs.deleted"), ("dialogue_sessions",)
    ),
    "audit": _grant("audit", (), ("llmos.audit.>",)),
}
assert set(GRANTS) == set(SERVICE_NAMES)


def _consumers(stream: str) -> list[str]:
    """Create, inspect, pull from and acknowledge consumers of one stream."""
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.ACK.{stream}.>",
    ]


def _bucket_reads(bucket: str) -> list[str]:
    stream = f"KV_{bucket}"
    return [f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>", f"$JS.API.STREAM.MSG.GET.{stream}"]


def permissions(grant: ServiceGrant) -> dict[str, dict[str, list[str]]]:
    kv = [f"$KV.{bucket}.>" for bucket in grant.buckets]
    jetstream = [*_DECLARE]
    for stream in grant.consumed_streams:
        jetstream += _consumers(stream)
    for bucket in grant.buckets:
        # Watching or listing keys runs an ordered consumer with flow control.
        jetstream += [*_bucket_reads(bucket), *_consumers(f"KV_{bucket}"), f"$JS.FC.KV_{bucket}.>"]
    for bucket in grant.read_buckets:
        jetstream += _bucket_reads(bucket)
    return {
        "publish": {"allow": [*grant.publish, *jetstream, *kv]},
        "subscribe": {"allow": [*grant.consume, _INBOX, *kv]},
    }


def new_secret() -> str:
    """A random password or key that nats-server reads as a string when it comes from an
    environment variable: there a value starting with a digit or '-' is parsed as a number or a
    date ("1h…" fails)."""
    return secrets.choice(string.ascii_letters) + secrets.token_urlsafe(18)


def new_credentials() -> dict[str, str]:
    return {user: new_secret() for user in (*SERVICE_NAMES, ADMIN_USER)}


def authorization_block(credentials: Mapping[str, str]) -> str:
    """The `authorization { users = [...] }` block of a nats-server configuration."""
    users = [{"user": ADMIN_USER, "password": credentials[ADMIN_USER]}]
    users += [
        {"user": service, "password": credentials[service], "permissions": permissions(GRANTS[service])}
        for service in SERVICE_NAMES
    ]
    # nats-server's configuration format accepts JSON values.
    return "authorization {\n  users = " + json.dumps(users, indent=2) + "\n}\n"


def password_variable(user: str) -> str:
    """The environment variable holding `user`'s password in the compose deployment."""
    return f"LLMOS_NATS_{user.upper()}_PASSWORD"


def compose_authorization() -> str:
    """deploy/nats/authorization.conf: the same users and grants as `llmos up`, with each password
    a reference to an environment variable of the nats container, so the file holds no secret."""
    placeholders = {user: f"@{password_variable(user)}@" for user in (*SERVICE_NAMES, ADMIN_USER)}
    block = authorization_block(placeholders)
    for variable in placeholders.values():
        # An unquoted $NAME is a variable to nats-server, resolved from its environment at start.
        block = block.replace(f'"{variable}"', "$" + variable.strip("@"))
    return COMPOSE_HEADER + block


COMPOSE_HEADER = """\
# GENERATED by `python -m llmos.natsauth compose` from llmos/natsauth.py; do not edit by hand
# (tests/unit/test_compose_nats.py fails when it is stale). One NATS user per service with the
# subjects DESIGN.md gives it; passwords come from the nats container's environment
# ($LLMOS_NATS_<USER>_PASSWORD, see `python -m llmos.natsauth compose-secrets`).
"""
COMPOSE_AUTHORIZATION = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "authorization.conf"


def main(argv: Sequence[str]) -> None:
    usage = "usage: python -m llmos.natsauth compose | compose-secrets FILE"
    if argv[:1] == ["compose"] and len(argv) == 1:
        COMPOSE_AUTHORIZATION.write_text(compose_authorization())
        print(f"wrote {COMPOSE_AUTHORIZATION}")
    elif argv[:1] == ["compose-secrets"] and len(argv) == 2:
        from llmos.secrets import main as secrets_main  # llmos.secrets builds on this module

        secrets_main(["compose", argv[1]])
    else:
        raise SystemExit(usage)


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


if __name__ == "__main__":
    main(sys.argv[1:])
