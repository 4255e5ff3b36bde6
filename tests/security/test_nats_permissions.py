"""Each service's NATS user publishes only to its own subjects, and the JetStream API does not
reach other services' streams and buckets (a real nats-server with the authorization `llmos up`
generates)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import KeyNotFoundError, NotFoundError

from llmos.bus.broker import Bus, declare_buckets, declare_streams
from llmos.natsauth import ADMIN_USER, GRANTS, authorization_block, new_credentials
from llmos.settings import SERVICE_NAMES
from llmos.stack import nats_command, port_open
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


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_a_service_declares_streams_and_consumes_its_own_subjects_under_its_user(
    secured_nats: tuple[str, dict[str, str]], service: str
) -> None:
    """The positive side of the JetStream grants: the real Bus start-up (declaring every stream
    and bucket) and a durable consumer per consumed subject, as the service itself makes them."""
    url, credentials = secured_nats
    bus = Bus(url, service, max_deliveries=3, user=service, password=credentials[service])
    await bus.start()
    try:
        for subject in GRANTS[service].consume:
            await bus.reserve(subject)
        for bucket in GRANTS[service].buckets:
            kv = await bus.key_value(bucket)
            await kv.put("probe", b"x")
            assert (await kv.get("probe")).value == b"x"
            await kv.delete("probe")
        with pytest.raises(KeyNotFoundError):
            await (await bus.key_value("api_keys")).get("no-such-digest")  # read-only, but readable
    finally:
        await bus.close()


async def jetstream_refused(url: str, user: str, password: str, action: Callable[[JetStreamContext], Awaitable[object]]) -> bool:
    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error))

    connection = await nats.connect(url, user=user, password=password, error_cb=on_error, allow_reconnect=False)
    try:
        with pytest.raises(Exception):
            await action(connection.jetstream(timeout=1))
        await asyncio.sleep(0.1)
    finally:
        await connection.close()
    return any("permissions violation" in error.lower() for error in errors)


async def test_the_jetstream_api_does_not_reach_other_services_data(secured_nats: tuple[str, dict[str, str]]) -> None:
    url, credentials = secured_nats
    admin = await nats.connect(url, user=ADMIN_USER, password=credentials[ADMIN_USER])
    js = admin.jetstream()
    try:
        await js.stream_info("AUDIT")  # declared already when a service started on this server
    except NotFoundError:
        await js.add_stream(name="AUDIT", subjects=["llmos.audit.>"])
    await js.publish("llmos.audit.ingest", b"who did what")
    await (await js.key_value("dialogue_sessions")).put("s1", b"sealed session")
    await admin.close()
    speech = ("speech", credentials["speech"])
    attacks: list[Callable[[JetStreamContext], Awaitable[object]]] = [
        lambda js: js.get_msg("AUDIT", 1),  # read the audit trail by sequence
        lambda js: js.delete_stream("AUDIT"),  # destroy events waiting for the audit service
        lambda js: js.purge_stream("AUDIT"),
        # keep audit events for one second only
        lambda js: js.update_stream(StreamConfig(name="AUDIT", subjects=["llmos.audit.>"], max_age=1.0)),
        lambda js: js.add_consumer("AUDIT", ConsumerConfig(durable_name="tap", filter_subject="llmos.audit.>")),
        lambda js: _kv_get(js, "dialogue_sessions", "s1"),  # another service's bucket
        lambda js: js.publish("$KV.api_keys.forged", b"an admin key"),  # api_keys is read-only
    ]
    for attack in attacks:
        assert await jetstream_refused(url, *speech, attack)
    # The audit service itself may consume AUDIT, and dialogue may read its sessions.
    dialogue = await nats.connect(url, user="dialogue", password=credentials["dialogue"])
    assert (await _kv_get(dialogue.jetstream(), "dialogue_sessions", "s1")) == b"sealed session"
    await dialogue.close()


async def test_services_create_missing_streams_and_only_the_admin_updates_them(secured_nats: tuple[str, dict[str, str]]) -> None:
    url, credentials = secured_nats
    speech = await nats.connect(url, user="speech", password=credentials["speech"])
    admin = await nats.connect(url, user=ADMIN_USER, password=credentials[ADMIN_USER])
    try:
        await declare_streams(speech.jetstream())  # as a service does at start: creates what is missing
        audit = (await admin.jetstream().stream_info("AUDIT")).config
        await admin.jetstream().update_stream(StreamConfig(name="AUDIT", subjects=audit.subjects, max_age=60.0))
        await declare_streams(speech.jetstream())  # differs now: a service leaves it, and goes on
        assert (await admin.jetstream().stream_info("AUDIT")).config.max_age == 60.0
        await declare_streams(admin.jetstream(), update=True)  # `llmos up`
        assert (await admin.jetstream().stream_info("AUDIT")).config.max_age == audit.max_age
    finally:
        await speech.close()
        await admin.close()


async def _kv_get(js: JetStreamContext, bucket: str, key: str) -> bytes | None:
    return (await (await js.key_value(bucket)).get(key)).value
