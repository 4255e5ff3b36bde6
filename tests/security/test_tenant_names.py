"""Tenant names have one alphabet wherever a tenant is created (issue 13, item 7): no separator can
be part of a tenant, so `acme/eu`, `acme.eu` or `Acme` are refused with a clear error by static
keys, issued keys, principals, requests naming a tenant and bus events, instead of becoming a
tenant whose name runs into another's ids, subjects or keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import nats
import pytest

from llmos.auth import Principal, check_tenant
from llmos.bus.broker import declare_buckets
from llmos.bus.subjects import INGEST_REQUESTED, dead_letter_subject
from llmos.errors import InvalidArgument
from llmos.keys import KeyStore, parse_static_keys
from llmos.v1 import events_pb2, ingest_pb2, ingest_pb2_grpc
from tests.conftest import NatsServer, RunningStack, platform_environment
from tests.grpc_helpers import ADMIN
from tests.integration.bus_helpers import last_message, last_sequence, publish

pytestmark = pytest.mark.security

# Each has a separator, a wildcard, upper case, or the wrong length.
NOT_TENANTS = ["acme/eu", "acme.eu", "acme|eu", "acme eu", "acme\x00", "acme>", "acme*", "Acme", "-acme", "a" * 64, "acme\n", "ac=me"]
TENANTS = ["acme", "globex", "acme-eu", "acme_eu", "7eleven", "a" * 63]


@pytest.mark.parametrize("tenant", TENANTS)
def test_names_of_the_alphabet_are_tenants(tenant: str) -> None:
    assert check_tenant(tenant) == tenant
    assert Principal("alice", tenant).tenant == tenant


@pytest.mark.parametrize("tenant", NOT_TENANTS)
def test_a_static_key_or_principal_naming_a_separator_is_refused(tenant: str) -> None:
    with pytest.raises(InvalidArgument, match="lower-case letters, digits") as error:
        parse_static_keys(f"k1=alice:{tenant}:user")
    assert error.value.field == "LLMOS_API_KEYS"
    with pytest.raises(InvalidArgument, match="is not a tenant name"):
        Principal("alice", tenant, frozenset({"user"}))


def test_the_error_quotes_a_huge_name_briefly() -> None:
    with pytest.raises(InvalidArgument) as error:
        check_tenant("x/" * 500_000)
    assert len(error.value.message) < 400


async def test_the_key_store_issues_no_key_for_such_a_tenant(nats_server: NatsServer) -> None:
    connection = await nats.connect(nats_server.url)
    try:
        js = connection.jetstream()
        await declare_buckets(js)
        store = await KeyStore.open(js)
        before = len(await store.records())
        for tenant in ("acme/eu", "acme.eu", "Acme"):
            with pytest.raises(InvalidArgument, match="is not a tenant name"):
                await store.create("carol", tenant, ("user",))
        assert len(await store.records()) == before
    finally:
        await connection.close()


def test_llmos_keys_create_refuses_it_with_the_alphabet(nats_server: NatsServer, tmp_path: Path) -> None:
    env = platform_environment(nats_server, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "llmos_cli.main", "keys", "create", "--subject", "carol", "--tenant", "acme/eu", "--role", "user"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1, result.stdout
    assert "tenant: 'acme/eu' is not a tenant name" in result.stderr and "lower-case letters" in result.stderr


async def test_an_administrator_naming_such_a_tenant_gets_invalid_argument(stack: RunningStack) -> None:
    async with grpc.aio.insecure_channel(stack.addr("ingest")) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await ingest.SubmitDocument(
                ingest_pb2.SubmitDocumentRequest(tenant="acme/eu", document_id="faq", content=b"Look-alike tenant."),
                metadata=ADMIN, timeout=10,
            )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant: 'acme/eu' is not a tenant name" in (error.value.details() or "")


async def test_a_bus_document_for_such_a_tenant_is_dead_lettered(stack: RunningStack) -> None:
    url = stack.settings.nats_url
    dlq = dead_letter_subject(INGEST_REQUESTED)
    before = await last_sequence(url, dlq)
    document = events_pb2.DocumentSubmitted(document_id="faq", tenant="acme/eu", content=b"Look-alike tenant on the bus.")
    await publish(url, INGEST_REQUESTED, document.SerializeToString())
    letter = events_pb2.DeadLetter.FromString((await last_message(url, dlq, after_seq=before, timeout_s=30)).data)
    assert "'acme/eu' is not a tenant name" in letter.error


def test_a_speech_domain_seed_for_such_a_tenant_is_refused(tmp_path: Path) -> None:
    from services.speech.app import parse_seed

    with pytest.raises(InvalidArgument, match="LLMOS_SPEECH_DOMAIN_SEED: tenant: 'acme/eu' is not a tenant name"):
        parse_seed(f"acme/eu={tmp_path}")
    assert parse_seed(f"acme={tmp_path}") == {"acme": [tmp_path]}
