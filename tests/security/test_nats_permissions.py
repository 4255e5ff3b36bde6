"""Each service's NATS user publishes only to its own subjects, and the JetStream API does not
reach other services' streams and buckets (a real nats-server with the authorization `llmos up`
generates)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest
from nats.js import JetStreamContext
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, RePublish, StreamConfig, StreamSource
from nats.js.errors import KeyNotFoundError, NotFoundError

from llmos.bus.broker import Bus, Subscription, declare_buckets, declare_streams
from llmos.bus.subjects import DOCS_DELETED, INTERACTIVE_LANE
from llmos.natsauth import ADMIN_USER, GRANTS, inbox_prefix
from llmos.settings import SERVICE_NAMES
from llmos.v1 import events_pb2
from tests.nats_helpers import secured_nats_server

pytestmark = pytest.mark.security

# One subject each service publishes, that no other service may publish to.
OWN_SUBJECT = {service: GRANTS[service].publish[0] for service in SERVICE_NAMES}


@pytest.fixture(scope="module")
async def secured_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, dict[str, str]]]:
    async with secured_nats_server(tmp_path_factory.mktemp("secured")) as server:
        admin = await nats.connect(server.url, user=ADMIN_USER, password=server.credentials[ADMIN_USER])
        await declare_buckets(admin.jetstream())
        await admin.close()
        yield server.url, server.credentials


async def violations(url: str, user: str, password: str, publish: list[str], subscribe: list[str]) -> list[str]:
    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error))

    connection = await nats.connect(
        url, user=user, password=password, error_cb=on_error, allow_reconnect=False, inbox_prefix=inbox_prefix(user)
    )
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
    and bucket), and each consumed subject's messages pulled, handled and acknowledged on both
    lanes, under the service's own user and inbox prefix."""
    url, credentials = secured_nats
    marker = uuid.uuid4().hex
    received: dict[tuple[str, str], asyncio.Event] = {}

    def handler(subject: str, lane: str) -> Callable[[events_pb2.DocumentDeleted], Awaitable[None]]:
        received[subject, lane] = asyncio.Event()

        async def handle(message: events_pb2.DocumentDeleted) -> None:
            if message.document_id == marker:
                received[subject, lane].set()

        return handle

    bus = Bus(url, service, max_deliveries=3, user=service, password=credentials[service])
    for subject in GRANTS[service].consume:
        for lane in ("", INTERACTIVE_LANE):
            bus.subscribe(Subscription(subject, events_pb2.DocumentDeleted, handler(subject, lane), lane=lane))
    await bus.start()
    try:
        admin = await nats.connect(url, user=ADMIN_USER, password=credentials[ADMIN_USER])
        for subject in GRANTS[service].consume:
            published = subject.replace("*", "acme").replace(">", service)
            await admin.jetstream().publish(published, events_pb2.DocumentDeleted(document_id=marker).SerializeToString())
        await admin.close()
        async with asyncio.timeout(10):
            for event in received.values():
                await event.wait()
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
    connection = await _connect(url, user, password, errors)
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
    dialogue = await nats.connect(url, user="dialogue", password=credentials["dialogue"], inbox_prefix=inbox_prefix("dialogue"))
    assert (await _kv_get(dialogue.jetstream(), "dialogue_sessions", "s1")) == b"sealed session"
    await dialogue.close()


async def test_services_create_missing_streams_and_only_the_admin_updates_them(secured_nats: tuple[str, dict[str, str]]) -> None:
    url, credentials = secured_nats
    speech = await nats.connect(url, user="speech", password=credentials["speech"], inbox_prefix=inbox_prefix("speech"))
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


async def _connect(url: str, user: str, password: str, errors: list[str] | None = None) -> nats.NATS:
    """`user`'s connection as the platform makes it: replies under its own inbox prefix."""

    async def on_error(error: Exception) -> None:
        if errors is not None:
            errors.append(str(error))

    return await nats.connect(
        url, user=user, password=password, error_cb=on_error, allow_reconnect=False, inbox_prefix=inbox_prefix(user)
    )


async def test_a_service_cannot_read_other_users_inboxes(secured_nats: tuple[str, dict[str, str]]) -> None:
    """Pull deliveries, KV replies and publish acknowledgements arrive in the reader's inbox: a
    tokenizer listening on every inbox would read each document and session another service reads."""
    url, credentials = secured_nats
    admin = await nats.connect(url, user=ADMIN_USER, password=credentials[ADMIN_USER])
    await (await admin.jetstream().key_value("dialogue_sessions")).put("s2", b"sealed session s2")
    await admin.close()
    errors: list[str] = []
    tokenizer = await _connect(url, "tokenizer", credentials["tokenizer"], errors)
    overheard: list[bytes] = []

    async def overhear(message: Msg) -> None:
        overheard.append(message.data)

    for inbox in ("_INBOX.>", "_INBOX.dialogue.>"):
        await tokenizer.subscribe(inbox, cb=overhear)
    await tokenizer.flush()
    dialogue = await nats.connect(url, user="dialogue", password=credentials["dialogue"], inbox_prefix=inbox_prefix("dialogue"))
    assert (await _kv_get(dialogue.jetstream(), "dialogue_sessions", "s2")) == b"sealed session s2"
    await dialogue.close()
    await asyncio.sleep(0.2)
    await tokenizer.close()
    assert overheard == []  # before: the KV reply to dialogue (the sealed session, base64 in JSON)
    assert len([error for error in errors if "permissions violation" in error.lower()]) == 2, errors


async def test_a_service_cannot_pull_or_acknowledge_another_services_consumer(secured_nats: tuple[str, dict[str, str]]) -> None:
    """Speech reads llmos.docs.deleted too, but through its own durable: pulling retrieval's would
    take the deletes away from the index."""
    url, credentials = secured_nats
    retrieval = Bus(url, "retrieval", max_deliveries=3, user="retrieval", password=credentials["retrieval"])
    await retrieval.start()
    try:
        await retrieval.reserve(DOCS_DELETED)
        durable = retrieval.durable_name(DOCS_DELETED)
    finally:
        await retrieval.close()
    admin = await nats.connect(url, user=ADMIN_USER, password=credentials[ADMIN_USER])
    deleted = events_pb2.DocumentDeleted(document_id="d1", tenant="acme")
    await admin.jetstream().publish(DOCS_DELETED, deleted.SerializeToString())
    await admin.close()
    speech = ("speech", credentials["speech"])

    async def pull(js: JetStreamContext) -> object:
        subscription = await js.pull_subscribe_bind(durable, stream="DOCS")
        return await subscription.fetch(1, timeout=1)

    async def inspect(js: JetStreamContext) -> object:
        return await js.consumer_info("DOCS", durable)

    assert await jetstream_refused(url, *speech, pull)
    assert await jetstream_refused(url, *speech, inspect)
    # The event is still there for retrieval, which pulls and acknowledges it under its own user.
    own = await _connect(url, "retrieval", credentials["retrieval"])
    subscription = await own.jetstream().pull_subscribe_bind(durable, stream="DOCS")
    pulled = []
    while "d1" not in pulled:  # after other tests' events on the shared server
        [message] = await subscription.fetch(1, timeout=5)
        pulled.append(events_pb2.DocumentDeleted.FromString(message.data).document_id)
        await message.ack_sync()
    await own.close()


async def test_only_the_admin_creates_streams_or_reads_api_keys_by_sequence(secured_nats: tuple[str, dict[str, str]]) -> None:
    """A stream a service may name and configure could source AUDIT or api_keys and republish
    them where it listens; reading api_keys by sequence enumerates every issued key's record. A
    service looks keys up by digest only."""
    url, credentials = secured_nats
    admin = await nats.connect(url, user=ADMIN_USER, password=credentials[ADMIN_USER])
    await declare_streams(admin.jetstream(), update=True)
    await (await admin.jetstream().key_value("api_keys")).put("digest-1", b'{"tenant": "acme"}')
    await admin.close()
    speech = ("speech", credentials["speech"])
    tap = StreamConfig(
        name="TAP", subjects=["tap.in"], sources=[StreamSource(name="AUDIT")],
        republish=RePublish(src=">", dest="_INBOX.speech.tap.>"),
    )
    attacks: list[Callable[[JetStreamContext], Awaitable[object]]] = [
        lambda js: js.add_stream(tap),
        lambda js: js.get_msg("KV_api_keys", 1),  # STREAM.MSG.GET by sequence
        lambda js: js.get_msg("KV_api_keys", 1, direct=True),  # direct get by sequence
    ]
    for attack in attacks:
        assert await jetstream_refused(url, *speech, attack)
    speech_connection = await nats.connect(url, user="speech", password=credentials["speech"], inbox_prefix=inbox_prefix("speech"))
    assert (await _kv_get(speech_connection.jetstream(), "api_keys", "digest-1")) == b'{"tenant": "acme"}'
    await speech_connection.close()


async def test_the_admin_turns_on_direct_key_lookups_for_a_bucket_made_before_them(secured_nats: tuple[str, dict[str, str]]) -> None:
    """A service reads api_keys by direct get only: on a bucket made by an older version (no direct
    gets) its lookups are refused until `llmos up` or `llmos streams` (declare, as admin) turns them on."""
    url, credentials = secured_nats
    admin = await nats.connect(url, user=ADMIN_USER, password=credentials[ADMIN_USER])
    js = admin.jetstream()
    await (await js.key_value("api_keys")).put("digest-2", b"record")
    config = (await js.stream_info("KV_api_keys")).config
    config.allow_direct = False
    await js.update_stream(config)
    try:
        assert await jetstream_refused(url, "speech", credentials["speech"], lambda js: _kv_get(js, "api_keys", "digest-2"))
        await declare_streams(js, update=True)
        assert (await js.stream_info("KV_api_keys")).config.allow_direct
        speech = await _connect(url, "speech", credentials["speech"])
        assert (await _kv_get(speech.jetstream(), "api_keys", "digest-2")) == b"record"
        await speech.close()
    finally:
        await admin.close()
