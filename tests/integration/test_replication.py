"""Replication as configuration (issue 16, item 1), on a real three-node NATS cluster on loopback
with the users `llmos up` generates: a service started with LLMOS_JETSTREAM_REPLICAS=3 creates
every stream and KV bucket on three servers, and `llmos streams` brings streams and buckets made
at one replica to three, messages kept."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import StreamInfo

from llmos.bus.broker import Bus, declare_streams
from llmos.bus.subjects import BUCKETS, CHUNKS_EMBEDDED, DOCS_FAILED, STREAMS, durable_name, ingest_requested, stream_for
from llmos.natsauth import ADMIN_USER, authorization_block, new_credentials
from llmos.v1 import events_pb2
from tests.cluster_helpers import NatsCluster, nats_cluster
from tests.conftest import REPO

pytestmark = pytest.mark.integration

REPLICAS = 3
# Every stream the platform declares, the KV buckets' streams included.
STREAM_NAMES = (*(spec.name for spec in STREAMS), *(f"KV_{bucket.name}" for bucket in BUCKETS))
CATCH_UP_S = 10.0


@pytest.fixture(scope="module")
def credentials() -> dict[str, str]:
    return new_credentials()


@pytest.fixture
def cluster(tmp_path: Path, credentials: dict[str, str]) -> Iterator[NatsCluster]:
    with nats_cluster(tmp_path / "cluster", REPLICAS, authorization_block(credentials)) as running:
        yield running


async def replicated(js: JetStreamContext, name: str, replicas: int) -> StreamInfo:
    """The stream's info once it has `replicas` copies, each caught up with its leader."""
    deadline = asyncio.get_running_loop().time() + CATCH_UP_S
    while True:
        info = await js.stream_info(name)
        followers = info.cluster.replicas if info.cluster and info.cluster.replicas else []
        if (
            info.config.num_replicas == replicas
            and info.cluster is not None
            and info.cluster.leader
            and len(followers) == replicas - 1
            and all(follower.current for follower in followers)
        ):
            return info
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name}: {info.config.num_replicas} replicas, cluster {info.cluster}")
        await asyncio.sleep(0.2)


async def consumer_replicated(js: JetStreamContext, subject: str, service: str, replicas: int) -> None:
    """Until `service`'s durable consumer of `subject` has `replicas` copies."""
    stream, durable = stream_for(subject).name, durable_name(service, subject)
    deadline = asyncio.get_running_loop().time() + CATCH_UP_S
    while True:
        info = await js.consumer_info(stream, durable)
        followers = info.cluster.replicas if info.cluster and info.cluster.replicas else []
        if info.cluster is not None and info.cluster.leader and len(followers) == replicas - 1:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{stream}/{durable}: cluster {info.cluster}")
        await asyncio.sleep(0.2)


async def test_a_service_creates_every_stream_and_bucket_on_three_servers(
    cluster: NatsCluster, credentials: dict[str, str]
) -> None:
    bus = Bus(cluster.urls[0], "ingest", max_deliveries=3, user="ingest", password=credentials["ingest"], replicas=REPLICAS)
    await bus.start()  # declares what is missing, under the service's own NATS grants
    admin = await nats.connect(cluster.urls[1], user=ADMIN_USER, password=credentials[ADMIN_USER])
    try:
        js = admin.jetstream()
        for name in STREAM_NAMES:
            info = await replicated(js, name, REPLICAS)
            servers = {info.cluster.leader, *(follower.name for follower in info.cluster.replicas or [])}
            assert servers == {node.name for node in cluster.nodes}, (name, servers)
        # Its durable consumers (shared by its replicas) are kept on three servers too.
        await bus.reserve(CHUNKS_EMBEDDED)
        await consumer_replicated(js, CHUNKS_EMBEDDED, "ingest", REPLICAS)
        # A message published through one node is stored on all three.
        await bus.publish(DOCS_FAILED, events_pb2.DocumentFailed(document_id="replicated", tenant="acme", reason="test"))
        info = await replicated(js, "DOCS", REPLICAS)
        assert info.state.messages == 1
    finally:
        await admin.close()
        await bus.close()


async def test_llmos_streams_raises_streams_and_buckets_made_at_one_replica_to_three(
    cluster: NatsCluster, credentials: dict[str, str], tmp_path: Path
) -> None:
    admin = await nats.connect(cluster.urls[0], user=ADMIN_USER, password=credentials[ADMIN_USER])
    try:
        js = admin.jetstream()
        await declare_streams(js, update=True)  # as one server had them: one replica each
        for name in STREAM_NAMES:
            assert (await js.stream_info(name)).config.num_replicas == 1, name
        # A durable consumer made on the one-replica stream, as a running service has.
        service = Bus(cluster.urls[1], "ingest", max_deliveries=3, user="ingest", password=credentials["ingest"])
        await service.start()
        await service.reserve(CHUNKS_EMBEDDED)
        await service.close()
        for index in range(5):
            document = events_pb2.DocumentSubmitted(document_id=f"before-{index}", tenant="acme", content=b"text")
            await js.publish(ingest_requested("acme"), document.SerializeToString())

        # A service configured for three leaves existing streams as they are (its grants do not
        # allow updates): only the admin's declaration moves them.
        service = Bus(
            cluster.urls[1], "ingest", max_deliveries=3, user="ingest", password=credentials["ingest"], replicas=REPLICAS
        )
        await service.start()
        await service.close()
        assert (await js.stream_info("INGEST")).config.num_replicas == 1

        result = subprocess.run(
            [sys.executable, "-m", "llmos_cli.main", "streams"],
            cwd=REPO,  # .env: the services' addresses the settings require
            env={
                **{key: value for key, value in os.environ.items() if not key.startswith("LLMOS_")},
                "LLMOS_HOME": str(tmp_path / "home"),
                "LLMOS_NATS_URL": cluster.urls[2],
                "LLMOS_NATS_USER": ADMIN_USER,
                "LLMOS_NATS_PASSWORD": credentials[ADMIN_USER],
                "LLMOS_JETSTREAM_REPLICAS": str(REPLICAS),
            },
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"at {REPLICAS} replica(s) each" in result.stdout

        for name in STREAM_NAMES:
            await replicated(js, name, REPLICAS)
        ingest = await replicated(js, "INGEST", REPLICAS)
        assert ingest.state.messages == 5  # the messages moved with the stream
        await consumer_replicated(js, CHUNKS_EMBEDDED, "ingest", REPLICAS)  # and the consumers with it
    finally:
        await admin.close()

