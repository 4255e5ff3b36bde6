"""`llmos keys publisher` and `llmos streams` under `llmos up --cluster` (issue 16, item 2): the
tenant publisher's user is reloaded into every node of the cluster, whose configuration keeps its
cluster block, so the publisher is let in (and, revoked, refused) wherever its client connects;
declaring the streams at fewer replicas than the cluster has nodes is refused.

Three real nats-servers on loopback, recorded in `run/stack.json` as `llmos up --cluster` records
them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from llmos.cluster import nats_cluster
from llmos.natsauth import (
    authorization_block,
    credentials_path,
    issue_publisher,
    new_credentials,
    revoke_publisher,
    write_credentials,
)
from llmos.settings import PlatformSettings, load_settings
from llmos.stack import StackProcess, declare_as_admin, reload_nats_users, write_stack

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


async def admitted(url: str, user: str, password: str) -> bool:
    try:
        connection = await nats.connect(url, user=user, password=password, allow_reconnect=False, connect_timeout=1)
    except Exception:  # noqa: BLE001 - refused, whatever the client calls it
        return False
    await connection.close()
    return True


async def comes_to(url: str, user: str, password: str, expected: bool) -> bool:
    """Whether the node comes to answer the login as `expected` within the time a reload takes."""
    for _ in range(50):
        if await admitted(url, user, password) == expected:
            return True
        await asyncio.sleep(0.1)
    return False


def test_a_tenant_publisher_reaches_every_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("LLMOS_HOME", str(home))
    settings = load_settings(PlatformSettings)
    credentials = new_credentials()
    write_credentials(credentials_path(home), credentials)
    with nats_cluster(tmp_path / "nats", 3, authorization_block(credentials)) as cluster:
        write_stack(settings, [
            StackProcess(f"nats-{node.name}", node.process.pid, str(node.log), "nats", node.url, str(node.config))
            for node in cluster.nodes if node.process is not None
        ])
        user, password = issue_publisher(home, "acme")
        assert not asyncio.run(admitted(cluster.urls[0], user, password))

        assert reload_nats_users(settings)
        assert all(asyncio.run(comes_to(url, user, password, expected=True)) for url in cluster.urls)
        # Each node's configuration still names it and its routes: still one cluster.
        assert all('server_name: "' in node.config.read_text() and "cluster {" in node.config.read_text() for node in cluster.nodes)
        cluster.wait_ready(timeout_s=10)

        assert revoke_publisher(home, "acme") and reload_nats_users(settings)
        assert all(asyncio.run(comes_to(url, user, password, expected=False)) for url in cluster.urls)

        # `llmos streams` with the one-server default would take the cluster's streams to R1.
        monkeypatch.setenv("LLMOS_NATS_URL", cluster.urls[0])
        monkeypatch.setenv("LLMOS_JETSTREAM_REPLICAS", "1")
        with pytest.raises(RuntimeError, match="set LLMOS_JETSTREAM_REPLICAS=3"):
            asyncio.run(declare_as_admin(load_settings(PlatformSettings)))
