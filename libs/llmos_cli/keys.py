"""`llmos keys create|list|revoke`: API keys in the platform's key store (NATS KV); `data-key` and
`service-keys` print fresh keys for settings."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from llmos.assertions import PUBLIC_KEYS_VARIABLE, SIGNING_KEYS_VARIABLE, new_service_keys
from llmos.auth import TENANT_ALPHABET
from llmos.bus.broker import declare_buckets
from llmos.crypto import new_key_entry
from llmos.keys import KeyStore, check_identity
from llmos.natsauth import connect_cli, issue_publisher, publisher_permissions, revoke_publisher, wait_for_user
from llmos.policy import ROLES
from llmos.settings import PlatformSettings, load_settings
from llmos.stack import reload_nats_users
from llmos_cli.output import add_json_option, print_json, print_table


async def _with_store(action: Callable[[KeyStore], Awaitable[int]]) -> int:
    settings = load_settings(PlatformSettings)
    connection = await connect_cli(settings, connect_timeout=3, allow_reconnect=False)
    try:
        js = connection.jetstream()
        await declare_buckets(js, replicas=settings.jetstream_replicas)
        return await action(await KeyStore.open(js))
    finally:
        await connection.close()


def cmd_create(args: argparse.Namespace) -> int:
    check_identity(args.subject, args.tenant, tuple(args.role))  # a bad name fails before connecting

    async def create(store: KeyStore) -> int:
        record, key = await store.create(args.subject, args.tenant, tuple(args.role))
        print(f"key id {record.key_id} for {record.subject} in tenant {record.tenant} ({', '.join(record.roles)})")
        print(key)
        print("the key is shown once; it is stored only as a SHA-256 digest")
        return 0

    return asyncio.run(_with_store(create))


def cmd_list(args: argparse.Namespace) -> int:
    async def show(store: KeyStore) -> int:
        records = [record for _, record in await store.records()]
        if args.json:
            print_json({"keys": [
                {"key_id": record.key_id, "subject": record.subject, "tenant": record.tenant, "roles": list(record.roles),
                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created_at))}
                for record in records
            ]})
            return 0
        print_table(["key id", "subject", "tenant", "roles", "created (UTC)"], [
            [record.key_id, record.subject, record.tenant, ",".join(record.roles), time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.created_at))]
            for record in records
        ])
        return 0

    return asyncio.run(_with_store(show))


def cmd_revoke(args: argparse.Namespace) -> int:
    async def revoke(store: KeyStore) -> int:
        record = await store.revoke(args.key_id)
        print(f"revoked {record.key_id} ({record.subject}, tenant {record.tenant}); services drop it within seconds")
        return 0

    return asyncio.run(_with_store(revoke))


def cmd_data_key(args: argparse.Namespace) -> int:
    print(new_key_entry())
    print("put it first in LLMOS_ENCRYPTION_KEYS to seal new data with it; keep older keys after it to read old data")
    return 0


def cmd_service_keys(args: argparse.Namespace) -> int:
    signing, public = new_service_keys()
    print(f"{SIGNING_KEYS_VARIABLE}={signing}")
    print(f"{PUBLIC_KEYS_VARIABLE}={public}")
    print("give each service only its own entry of the signing keys (service:key); every service gets all public keys")
    return 0


def cmd_publisher(args: argparse.Namespace) -> int:
    """NATS credentials that publish one tenant's documents (llmos.natsauth), in a form
    `eval "$(llmos keys publisher TENANT)"` exports for the `nats` CLI and the README's snippet."""
    settings = load_settings(PlatformSettings)
    if args.revoke:
        if not revoke_publisher(settings.home, args.tenant):
            print(f"tenant {args.tenant} has no NATS publisher")
            return 1
        reload_nats_users(settings)
        print(f"revoked the NATS publisher of tenant {args.tenant}")
        return 0
    user, password = issue_publisher(settings.home, args.tenant)
    running = reload_nats_users(settings)
    if running:
        asyncio.run(wait_for_user(settings.nats_url, user, password))
    subjects = ", ".join(publisher_permissions(args.tenant)["publish"]["allow"])
    print(f"export NATS_USER={user}")
    print(f"export NATS_PASSWORD={password}")
    print(f"# may publish {subjects} only; a new password replaces the old one; revoke with --revoke")
    if not running:
        print("# no stack runs under LLMOS_HOME now: the next `llmos up` lets it in")
    return 0


def register(commands: argparse._SubParsersAction, evals: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="issue, list and revoke API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="issue a key (printed once)")
    create.add_argument("--subject", required=True, help="who the key is for")
    create.add_argument("--tenant", required=True, help=f"the tenant: {TENANT_ALPHABET}")
    create.add_argument("--role", action="append", choices=ROLES, required=True, help="repeat for several roles")
    create.set_defaults(run=cmd_create)
    add_json_option(keys.add_parser("list", help="issued keys (ids and principals, never the keys)")).set_defaults(run=cmd_list)
    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=cmd_revoke)
    publisher = keys.add_parser("publisher", help="NATS credentials publishing one tenant's documents")
    publisher.add_argument("tenant")
    publisher.add_argument("--revoke", action="store_true", help="remove the tenant's publisher")
    publisher.set_defaults(run=cmd_publisher)
    keys.add_parser("data-key", help="a new key for LLMOS_ENCRYPTION_KEYS (data at rest)").set_defaults(run=cmd_data_key)
    keys.add_parser(
        "service-keys", help="new signing keys of the services that call others, and their public keys"
    ).set_defaults(run=cmd_service_keys)
