"""Tenant publishers on the bus (issue 13, items 9 and 14), on a real nats-server with the
authorization `llmos up` generates: a tenant's publisher may publish only that tenant's
documents (`llmos.ingest.requested.<tenant>`), and ingest takes the tenant from the subject, so
a payload naming another tenant is dead-lettered instead of ingested for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import nats
import pytest

from llmos.auth import Principal
from llmos.bus.broker import Bus, declare_streams
from llmos.bus.subjects import INGEST_REQUESTED, dead_letter_subject, ingest_requested
from llmos.errors import InvalidArgument
from llmos.natsauth import (
    ADMIN_USER,
    inbox_prefix,
    issue_publisher,
    publisher_user,
    read_publishers,
    revoke_publisher,
)
from llmos.v1 import events_pb2
from services.ingest.core import IngestCore
from services.ingest.handlers import subscriptions
from tests.nats_helpers import secured_nats_server

pytestmark = pytest.mark.security

TENANT = "globex"


@dataclass
class SecuredNats:
    url: str
    credentials: dict[str, str]
    publisher_password: str


@pytest.fixture(scope="module")
async def secured_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SecuredNats]:
    home = tmp_path_factory.mktemp("home")
    _, password = issue_publisher(home, TENANT)
    async with secured_nats_server(tmp_path_factory.mktemp("secured"), read_publishers(home)) as server:
        admin = await nats.connect(server.url, user=ADMIN_USER, password=server.credentials[ADMIN_USER])
        await declare_streams(admin.jetstream(), update=True)
        await admin.close()
        yield SecuredNats(server.url, server.credentials, password)


async def publisher(nats_: SecuredNats, errors: list[str]) -> nats.NATS:
    async def on_error(error: Exception) -> None:
        errors.append(str(error))

    user = publisher_user(TENANT)
    return await nats.connect(
        nats_.url, user=user, password=nats_.publisher_password, inbox_prefix=inbox_prefix(user),
        error_cb=on_error, allow_reconnect=False,
    )


async def test_a_tenant_publisher_publishes_its_own_documents_and_nothing_else(secured_nats: SecuredNats) -> None:
    errors: list[str] = []
    connection = await publisher(secured_nats, errors)
    try:
        document = events_pb2.DocumentSubmitted(document_id="own", content=b"ours")
        ack = await connection.jetstream().publish(ingest_requested(TENANT), document.SerializeToString())
        assert ack.stream == "INGEST"
        assert errors == []
        for subject in (ingest_requested("acme"), INGEST_REQUESTED, "llmos.chunks.created", "$JS.API.STREAM.INFO.INGEST"):
            await connection.publish(subject, b"x")
        await connection.subscribe("_INBOX.>")  # other users' replies
        await connection.subscribe("llmos.ingest.>")  # other tenants' documents
        await connection.flush()
        await asyncio.sleep(0.2)
    finally:
        await connection.close()
    refused = [error for error in errors if "permissions violation" in error.lower()]
    assert len(refused) == 6, errors


@dataclass
class RecordingCore:
    """Stands in for IngestCore behind ingest's real handlers: what they submit, and for whom."""

    submitted: list[tuple[Principal, events_pb2.DocumentSubmitted]] = field(default_factory=list)

    async def submit(self, principal: Principal, document: events_pb2.DocumentSubmitted) -> None:
        self.submitted.append((principal, document))

    async def advance(self, *report: object) -> bool:
        return True


async def test_ingest_takes_the_tenant_from_the_subject_and_refuses_a_payload_naming_another(
    secured_nats: SecuredNats,
) -> None:
    core = RecordingCore()
    ingest = Bus(secured_nats.url, "ingest", max_deliveries=3, user="ingest", password=secured_nats.credentials["ingest"])
    for subscription in subscriptions(cast(IngestCore, core), bulk_workers=1):
        ingest.subscribe(subscription)
    await ingest.start()
    errors: list[str] = []
    connection = await publisher(secured_nats, errors)
    try:
        js = connection.jetstream()
        for document_id, tenant in (("unnamed", ""), ("forged", "acme"), ("named", TENANT)):
            document = events_pb2.DocumentSubmitted(document_id=document_id, tenant=tenant, content=b"text")
            await js.publish(ingest_requested(TENANT), document.SerializeToString())
        async with asyncio.timeout(10):
            while not {"named", "unnamed"} <= {document.document_id for _, document in core.submitted}:
                await asyncio.sleep(0.05)
    finally:
        await connection.close()
    admin = await nats.connect(secured_nats.url, user=ADMIN_USER, password=secured_nats.credentials[ADMIN_USER])
    try:
        dlq = dead_letter_subject(ingest_requested(TENANT))
        async with asyncio.timeout(10):
            while True:
                try:
                    letter = events_pb2.DeadLetter.FromString((await admin.jetstream().get_last_msg("DLQ", dlq)).data)
                    break
                except nats.js.errors.NotFoundError:
                    await asyncio.sleep(0.05)
    finally:
        await admin.close()
        await ingest.close()
    assert errors == []
    # "own" is the previous test's document, still waiting in the stream.
    assert sorted(document.document_id for _, document in core.submitted) == ["named", "own", "unnamed"]
    for principal, document in core.submitted:
        assert document.tenant == TENANT and principal.tenant == TENANT
        assert principal.subject == f"bus:{ingest_requested(TENANT)}"
    assert events_pb2.DocumentSubmitted.FromString(letter.payload).document_id == "forged"
    assert "'acme'" in letter.error and f"'{TENANT}' only" in letter.error and letter.service == "ingest"


def test_a_tenant_publisher_is_issued_replaced_and_revoked(tmp_path: Path) -> None:
    first = issue_publisher(tmp_path, "acme")
    second = issue_publisher(tmp_path, "acme")
    assert first[0] == second[0] == "publisher-acme" and first[1] != second[1]
    assert read_publishers(tmp_path) == {"acme": second[1]}
    assert (tmp_path / "nats-publishers.json").stat().st_mode & 0o777 == 0o600
    assert revoke_publisher(tmp_path, "acme") and read_publishers(tmp_path) == {}
    assert not revoke_publisher(tmp_path, "acme")
    with pytest.raises(InvalidArgument, match="tenant"):
        issue_publisher(tmp_path, "acme.>")  # would widen the subject it may publish on
