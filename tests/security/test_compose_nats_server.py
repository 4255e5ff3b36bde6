"""The compose deployment's nats-server configuration (deploy/nats/, as the container runs it,
with a fresh secrets file): every service user is held to its grants, and JetStream keeps stream
data encrypted on disk, so documents waiting in INGEST are not readable there."""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from llmos.natsauth import ADMIN_USER, COMPOSE_AUTHORIZATION, GRANTS, password_variable
from llmos.secrets import compose_secrets
from llmos.settings import SERVICE_NAMES
from llmos.stack import nats_server_binary, port_open
from tests.conftest import NatsServer, free_port
from tests.security.test_nats_permissions import violations

pytestmark = pytest.mark.security

NATS_CONF = COMPOSE_AUTHORIZATION.parent / "nats-server.conf"


class ComposeNats:
    def __init__(self, url: str, store: Path, secrets: dict[str, str]) -> None:
        self.url, self.store, self.secrets = url, store, secrets

    def password(self, user: str) -> str:
        return self.secrets[password_variable(user)]


@pytest.fixture(scope="module")
async def compose_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ComposeNats]:
    folder = tmp_path_factory.mktemp("compose-nats")
    port, monitor = free_port(), free_port()
    # The container's file with only its addresses and store moved to this machine.
    config = NATS_CONF.read_text()
    config = re.sub(r'^listen: .*$', f'listen: "127.0.0.1:{port}"', config, flags=re.MULTILINE)
    config = re.sub(r'^http: .*$', f'http: "127.0.0.1:{monitor}"', config, flags=re.MULTILINE)
    config = config.replace('store_dir: "/data"', f'store_dir: "{folder / "data"}"')
    (folder / "nats-server.conf").write_text(config)
    (folder / "authorization.conf").write_text(COMPOSE_AUTHORIZATION.read_text())
    secrets = dict(line.split("=", 1) for line in compose_secrets().splitlines())
    process = subprocess.Popen(
        [nats_server_binary(), "-c", str(folder / "nats-server.conf")],
        env={"PATH": "/usr/bin:/bin", **secrets}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if port_open("127.0.0.1", port) or process.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert process.poll() is None, "nats-server did not start with the compose configuration"
        yield ComposeNats(f"nats://127.0.0.1:{port}", folder / "data", secrets)
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_only_the_configured_passwords_get_in(compose_nats: ComposeNats) -> None:
    for user in (ADMIN_USER, *SERVICE_NAMES):
        connection = await nats.connect(compose_nats.url, user=user, password=compose_nats.password(user), allow_reconnect=False)
        await connection.close()
    for options in ({}, {"user": "ingest", "password": compose_nats.password("retrieval")}):
        with pytest.raises(Exception):
            await nats.connect(compose_nats.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **options)


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_a_compose_service_is_held_to_its_grant(compose_nats: ComposeNats, service: str) -> None:
    password = compose_nats.password(service)
    own = [subject.replace(">", "x") for subject in GRANTS[service].publish]
    assert await violations(compose_nats.url, service, password, own, []) == []
    foreign = sorted({s for other in SERVICE_NAMES if other != service for s in GRANTS[other].publish} - set(GRANTS[service].publish))
    errors = await violations(compose_nats.url, service, password, [s.replace(">", "x") for s in foreign[:3]], [])
    assert len(errors) == min(3, len(foreign)) and all("permissions violation" in e.lower() for e in errors), (service, errors)


async def stored_document(url: str, marker: str, **credentials: str) -> None:
    """A document waiting in an INGEST-like stream, as ingest's producers leave it."""
    connection = await nats.connect(url, **credentials)
    try:
        js = connection.jetstream()
        stream = f"ATREST_{uuid.uuid4().hex[:8]}"
        subject = f"atrest.{stream}"
        await js.add_stream(name=stream, subjects=[subject])
        await js.publish(subject, f"customer letter: {marker}".encode())
        assert (await js.get_last_msg(stream, subject)).data.endswith(marker.encode())
    finally:
        await connection.close()


def on_disk(store: Path, needle: bytes) -> bool:
    return any(needle in path.read_bytes() for path in store.rglob("*") if path.is_file())


async def test_jetstream_data_is_encrypted_on_disk(compose_nats: ComposeNats, nats_server: NatsServer) -> None:
    marker = f"IBAN-like secret {uuid.uuid4().hex}"
    # Control: the same write on an unencrypted server is readable in its files.
    await stored_document(nats_server.url, marker + "-control")
    for _ in range(100):
        if on_disk(nats_server.store, (marker + "-control").encode()):
            break
        await asyncio.sleep(0.05)
    assert on_disk(nats_server.store, (marker + "-control").encode())
    await stored_document(compose_nats.url, marker, user=ADMIN_USER, password=compose_nats.password(ADMIN_USER))
    await asyncio.sleep(0.5)
    assert not on_disk(compose_nats.store, marker.encode())
