"""NATS users with subject permissions: each service may publish and subscribe only where
DESIGN.md says it does.

`llmos up` generates one user per service (random passwords, kept in
`$LLMOS_HOME/run/nats-credentials.json`, mode 0600) plus an `admin` user for the command line,
and writes the `authorization` block into the nats-server configuration. A publish outside a
user's grant is refused by the server with a permissions violation.

The JetStream API is granted per stream and consumer, because it reaches stored data by other
subjects: a user with `$JS.API.>` could read any stream or bucket (a consumer, a direct get) and
delete the AUDIT stream. A service may look up streams and create the platform's own by name
(every service declares them at start; a stream of its own naming could source AUDIT and
republish it where the service listens), create, pull and acknowledge only its own durable
consumers (`<service>-<subject>[-<lane>]`: speech cannot drain retrieval's deletes), read and
write only its own KV buckets, and look `api_keys` up by key digest only. Deleting, purging or
reconfiguring streams, other streams, and reading messages by sequence are left to `admin`.

Replies (pull deliveries, KV reads, publish acknowledgements) arrive in the requester's inbox;
each user has its own inbox prefix (`_INBOX.<user>`, set by llmos.bus.broker) and may subscribe
there only, so no service reads another's deliveries.

Tenant publishers: `llmos keys publisher TENANT` issues a user (`publisher-<tenant>`) that may
publish documents on `llmos.ingest.requested.<tenant>` and nothing else; ingest takes the tenant
from that subject. Their passwords live in `$LLMOS_HOME/nats-publishers.json` (mode 0600), read
by `llmos up` and reloaded into a running nats-server.

The compose deployment uses the same table: `python -m llmos.natsauth compose` writes
deploy/nats/authorization.conf (passwords as environment references); the env file holding them
is made with every other secret of a deployment by `python -m llmos.secrets compose FILE`
(`python -m llmos.natsauth compose-secrets FILE` does the same).
"""

from __future__ import annotations

import asyncio
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

from llmos.bus.subjects import (
    BUCKETS,
    INGEST_REQUESTED,
    INGEST_REQUESTED_BY_TENANT,
    INTERACTIVE_LANE,
    STREAMS,
    check_token,
    dead_letter_subject,
    durable_name,
    ingest_requested,
    stream_for,
)
from llmos.settings import GATEWAY, SERVICE_NAMES, PlatformSettings

CREDENTIALS_FILE = "nats-credentials.json"
PUBLISHERS_FILE = "nats-publishers.json"
ADMIN_USER = "admin"
PUBLISHER_PREFIX = "publisher-"
# Declaring streams and buckets at start: look up and create the platform's streams that are
# missing, by name. Never update, delete or purge: a compromised service could otherwise shorten
# AUDIT's retention. Bringing existing streams to a new version's configuration is the admin's
# (`llmos up`).
_DECLARE = (
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.*",
    *(f"$JS.API.STREAM.CREATE.{spec.name}" for spec in STREAMS),
    *(f"$JS.API.STREAM.CREATE.KV_{bucket.name}" for bucket in BUCKETS),
)
# Durable consumers a service may own on each subject it consumes: the bulk and interactive
# lanes (llmos.bus.broker.priority_lanes).
_LANES = ("", INTERACTIVE_LANE)
# Retrieval replicas with an embedded index keep consumers of their own, named after the replica
# (services/retrieval/app.py: `replica-<LLMOS_RETRIEVAL_REPLICA>`); name more here to run more.
EMBEDDED_RETRIEVAL_REPLICAS = ("replica-0",)


@dataclass(frozen=True)
class ServiceGrant:
    service: str
    publish: tuple[str, ...]
    consume: tuple[str, ...]
    buckets: tuple[str, ...] = ()  # read and write
    read_buckets: tuple[str, ...] = ()  # looked up by key only
    lanes: tuple[str, ...] = _LANES

    @property
    def consumed_streams(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(stream_for(subject).name for subject in self.consume))

    def durables(self, stream: str) -> list[str]:
        """The service's own durable consumer names on `stream`."""
        return [
            durable_name(self.service, subject, lane)
            for subject in self.consume
            if stream_for(subject).name == stream
            for lane in self.lanes
        ]


def _grant(
    service: str,
    publish: tuple[str, ...],
    consume: tuple[str, ...],
    buckets: tuple[str, ...] = (),
    lanes: tuple[str, ...] = _LANES,
) -> ServiceGrant:
    # Every service audits, dead-letters what it consumes and checks API keys.
    return ServiceGrant(
        service=service,
        publish=(*publish, f"llmos.audit.{service}", *(dead_letter_subject(subject) for subject in consume)),
        consume=consume,
        buckets=buckets,
        read_buckets=("api_keys",),
        lanes=lanes,
    )


GRANTS: dict[str, ServiceGrant] = {
    "ingest": _grant(
        "ingest",
        ("llmos.chunks.created", "llmos.docs.failed", "llmos.docs.deleted"),
        (INGEST_REQUESTED, INGEST_REQUESTED_BY_TENANT, "llmos.chunks.embedded", "llmos.docs.indexed"),
        ("document_status",),
    ),
    "tokenizer": _grant("tokenizer", (), ()),
    "inference": _grant("inference", ("llmos.chunks.embedded",), ("llmos.chunks.created",)),
    "retrieval": _grant(
        "retrieval", ("llmos.docs.indexed",), ("llmos.chunks.embedded", "llmos.docs.deleted"), ("user_profiles",),
        (*_LANES, *(f"{replica}{suffix}" for replica in EMBEDDED_RETRIEVAL_REPLICAS for suffix in ("", f"-{INTERACTIVE_LANE}"))),
    ),
    "speech": _grant("speech", ("llmos.speech.>",), ("llmos.docs.indexed", "llmos.docs.deleted")),
    "dialogue": _grant(
        "dialogue", ("llmos.dialogue.>",), ("llmos.docs.indexed", "llmos.docs.deleted"), ("dialogue_sessions",)
    ),
    "audit": _grant("audit", (), ("llmos.audit.>",)),
    # checks API keys and audits, like every service; consumes nothing
    GATEWAY: _grant(GATEWAY, (), ()),
}
# Every process of the platform with a NATS user of its own: the gRPC services and the gateway.
BUS_USERS = (*SERVICE_NAMES, GATEWAY)
assert set(GRANTS) == set(BUS_USERS)


def _consumer(stream: str, consumer: str) -> list[str]:
    """Create, inspect, pull from and acknowledge one named consumer of a stream."""
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>",  # with its filter subject
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
        f"$JS.API.CONSUMER.INFO.{stream}.{consumer}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


def _own_bucket(bucket: str) -> list[str]:
    """Everything on a bucket of the service's own: reads by key or revision, and the ordered
    consumers (any name, with flow control) that watch or list keys."""
    stream = f"KV_{bucket}"
    return [
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        *_consumer(stream, "*"),
        f"$JS.FC.{stream}.>",
    ]


def _key_lookups(bucket: str) -> list[str]:
    """A direct get of one key's last value: the caller must know the key (an API key's digest)."""
    return [f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.*"]


def inbox_prefix(user: str) -> str:
    """Where `user`'s replies arrive (pull deliveries, KV reads, publish acknowledgements): its
    own inbox subtree, the only one it may subscribe to."""
    return f"_INBOX.{user}"


def permissions(grant: ServiceGrant) -> dict[str, dict[str, list[str]]]:
    kv = [f"$KV.{bucket}.>" for bucket in grant.buckets]
    jetstream = [*_DECLARE]
    for stream in grant.consumed_streams:
        for consumer in grant.durables(stream):
            jetstream += _consumer(stream, consumer)
    for bucket in grant.buckets:
        jetstream += _own_bucket(bucket)
    for bucket in grant.read_buckets:
        jetstream += _key_lookups(bucket)
    return {
        "publish": {"allow": [*grant.publish, *jetstream, *kv]},
        "subscribe": {"allow": [*grant.consume, f"{inbox_prefix(grant.service)}.>", *kv]},
    }


def publisher_user(tenant: str) -> str:
    """The NATS user that publishes `tenant`'s documents."""
    return PUBLISHER_PREFIX + check_token("tenant", tenant)


def publisher_permissions(tenant: str) -> dict[str, dict[str, list[str]]]:
    """Publish `tenant`'s documents, and read the stream's acknowledgements: nothing else."""
    return {
        "publish": {"allow": [ingest_requested(tenant)]},
        "subscribe": {"allow": [f"{inbox_prefix(publisher_user(tenant))}.>"]},
    }


def new_secret() -> str:
    """A random password or key that nats-server reads as a string when it comes from an
    environment variable: there a value starting with a digit or '-' is parsed as a number or a
    date ("1h…" fails)."""
    return secrets.choice(string.ascii_letters) + secrets.token_urlsafe(18)


def new_credentials() -> dict[str, str]:
    return {user: new_secret() for user in (*BUS_USERS, ADMIN_USER)}


def authorization_block(credentials: Mapping[str, str], publishers: Mapping[str, str] | None = None) -> str:
    """The `authorization { users = [...] }` block of a nats-server configuration: the admin,
    the services, and a publisher per tenant in `publishers` (tenant -> password)."""
    users: list[dict[str, Any]] = [{"user": ADMIN_USER, "password": credentials[ADMIN_USER]}]
    users += [
        {"user": service, "password": credentials[service], "permissions": permissions(GRANTS[service])}
        for service in BUS_USERS
    ]
    users += [
        {"user": publisher_user(tenant), "password": password, "permissions": publisher_permissions(tenant)}
        for tenant, password in sorted((publishers or {}).items())
    ]
    # nats-server's configuration format accepts JSON values.
    return "authorization {\n  users = " + json.dumps(users, indent=2) + "\n}\n"


def password_variable(user: str) -> str:
    """The environment variable holding `user`'s password in the compose deployment."""
    return f"LLMOS_NATS_{user.upper()}_PASSWORD"


def compose_authorization() -> str:
    """deploy/nats/authorization.conf: the same users and grants as `llmos up`, with each password
    a reference to an environment variable of the nats container, so the file holds no secret."""
    placeholders = {user: f"@{password_variable(user)}@" for user in (*BUS_USERS, ADMIN_USER)}
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


def publishers_path(home: Path) -> Path:
    """Tenant publishers outlive a stack (`llmos down` keeps them), unlike the services' passwords."""
    return home / PUBLISHERS_FILE


def read_publishers(home: Path) -> dict[str, str]:
    """Tenant -> password of every tenant publisher issued under `home`."""
    return read_credentials(publishers_path(home)) or {}


def issue_publisher(home: Path, tenant: str) -> tuple[str, str]:
    """A new password for `tenant`'s publisher (replacing any before it); returns user and password."""
    user = publisher_user(tenant)
    publishers = read_publishers(home)
    publishers[tenant] = new_secret()
    write_credentials(publishers_path(home), publishers)
    return user, publishers[tenant]


def revoke_publisher(home: Path, tenant: str) -> bool:
    """Remove `tenant`'s publisher; False when it had none."""
    publishers = read_publishers(home)
    if publishers.pop(check_token("tenant", tenant), None) is None:
        return False
    write_credentials(publishers_path(home), publishers)
    return True


def cli_user(settings: PlatformSettings) -> tuple[str, str]:
    """The NATS user of a command-line tool: its own settings, else the stack's admin user."""
    if settings.nats_user:
        return settings.nats_user, settings.nats_password
    credentials = read_credentials(credentials_path(settings.home))
    return (ADMIN_USER, credentials[ADMIN_USER]) if credentials else ("", "")


async def wait_for_user(nats_url: str, user: str, password: str, timeout_s: float = 10.0) -> None:
    """Until nats-server, reloading its configuration, lets `user` in."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            connection = await nats.connect(
                nats_url, user=user, password=password, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=1
            )
        except Exception:  # noqa: BLE001 - refused until the reload takes effect
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"nats-server at {nats_url} did not accept {user} within {timeout_s:.0f} s") from None
            await asyncio.sleep(0.1)
        else:
            await connection.close()
            return


async def connect_cli(settings: PlatformSettings, **options: Any) -> nats.NATS:
    user, password = cli_user(settings)
    if user:
        options.update(user=user, password=password)
    return await nats.connect(settings.nats_url, **options)


if __name__ == "__main__":
    main(sys.argv[1:])
