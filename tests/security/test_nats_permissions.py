"""Each service's NATS user publishes only to its own subjects (a real nats-server with the
authorization `llmos up` generates)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from llmos.bus.broker import declare_buckets
from llmos.cli.stack import nats_command, port_open
from llmos.natsauth import ADMIN_USER, GRANTS, authorization_block, new_credentials
from llmos.settings import SERVICE_NAMES
from tests.conftest import free_port

pytestmark = pytest.mark.security

# One subject each service publishes, that no other service may publish to.
OWN_SUBJECT = {service: GRANTS[service].publish[0] for service in SERVICE_NAMES}


@pytest.fixture(scope="module")
async def secured_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, dict[str, str]]]:
    credentials = new_credentials()
    port = free_port()
    process = subprocess.Popen(
        nats_command(tmp_path_factory.mktemp("secured") / "js", "127.0.0.1", port, free_port(), authorization_block(credentials)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if port_open("127.0.0.1", port):
                break
            await asyncio.sleep(0.05)
        url = f"nats://127.0.0.1:{port}"
        admin = await nats.connect(url, user=ADMIN_USER, password=credentials[ADMIN_USER])
        await declare_buckets(admin.jetstream())
        await admin.close()
        yield url, credentials
    finally:
        process.terminate()
        process.wait(timeout=10)


async def violations(url: str, user: str, password: str, publish: list[str], subscribe: list[str]) -> list[str]:
    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error))

    connection = await nats.connect(url, user=user, password=password, error_cb=on_error, allow_reconnect=False)
    try:
        for subject in subscribe:
            await connection.subscribe(subject)
        for subject in publish:
            await connection.publish(subject, b"x")
        await connection.flush()
        await asyncio.sleep(0.2)
    finally:
        await connection.close()
    return errors


async def test_anonymous_and_wrong_password_are_refused(secured_nats: tuple[str, dict[str, str]]) -> None:
    url, _ = secured_nats
    for options in ({}, {"user": "ingest", "password": "wrong"}):
        with pytest.raises(Exception):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **options)


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_a_service_publishes_only_to_its_own_subjects(secured_nats: tuple[str, dict[str, str]], service: str) -> None:
    url, credentials = secured_nats
    allowed = [subject.replace(">", "x") for subject in GRANTS[service].publish]
    assert await violations(url, service, credentials[service], allowed, []) == []
    foreign = [subject for other, subject in OWN_SUBJECT.items() if other != service and subject not in GRANTS[service].publish]
    for subject in foreign:
        errors = await violations(url, service, credentials[service], [subject.replace(">", "x")], [])
        assert errors and "permissions violation" in errors[0].lower(), f"{service} published to {subject}"


async def test_a_service_cannot_read_another_services_bucket_or_tap_the_audit_trail(secured_nats: tuple[str, dict[str, str]]) -> None:
    url, credentials = secured_nats
    errors = await violations(url, "speech", credentials["speech"], ["$KV.dialogue_sessions.s1"], ["llmos.audit.>"])
    assert len(errors) == 2 and all("permissions violation" in error.lower() for error in errors)
