"""Retrieval under faults, each with a retrieval process of its own (own replica name, so
its own index and durable consumers) fed on `llmos.chunks.embedded`:

- kill -9 while 1,000 documents flow, restart: exactly those documents, every chunk once;
- nats-server restarted mid-stream (same store): nothing lost;
- a 10,000-document burst: the process's peak memory stays bounded (and is reported).

Each test writes to a tenant named after its replica: a new replica reads the whole stream,
other tests' messages included. Vectors are random unit vectors: this is about delivery and
storage, not relevance.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import numpy as np
import pytest

from llmos.bus.subjects import CHUNKS_EMBEDDED, stream_for
from llmos.v1 import common_pb2, events_pb2
from services.ingest.core import chunk_id
from llmos.stack import nats_command, port_open
from services.retrieval.index import ChunkFilter, EdgeIndex, Hit
from tests.conftest import NatsServer, free_port, platform_environment

pytestmark = pytest.mark.integration

DOCUMENTS = int(os.environ.get("LLMOS_TEST_FAULT_DOCUMENTS", "1000"))


def embedded_message(rng: np.random.Generator, tenant: str, number: int, chunks: int) -> events_pb2.ChunksEmbedded:
    document_id = f"doc-{number}"
    message = events_pb2.ChunksEmbedded(document_id=document_id, tenant=tenant, content_hash="v1")
    message.submitted_at.GetCurrentTime()
    vectors = rng.normal(size=(chunks, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for index, vector in enumerate(vectors):
        chunk = common_pb2.Chunk(chunk_id=chunk_id(tenant, document_id, index), document_id=document_id,
                                 tenant=tenant, index=index, text=f"document {number} part {index}")
        message.chunks.append(events_pb2.EmbeddedChunk(chunk=chunk, vector=vector.tolist()))
    return message


def replica_env(nats: NatsServer, home: Path, replica: str) -> dict[str, str]:
    env = platform_environment(nats, home)
    env["LLMOS_RETRIEVAL_REPLICA"] = replica
    env["LLMOS_LOG_LEVEL"] = "WARNING"
    return env


def durable_of(replica: str) -> str:
    return f"retrieval-{CHUNKS_EMBEDDED.replace('.', '-')}-replica-{replica}"


def stored_chunks(home: Path, replica: str) -> list[Hit]:
    """Every chunk of the test's tenant (named after its replica) in a stopped replica's index."""
    index = EdgeIndex(home / "qdrant" / f"edge-{replica}", 384, 256.0)
    try:
        return index.chunks(ChunkFilter(replica))
    finally:
        index.close()


async def wait_drained(url: str, durable: str, process: subprocess.Popen[bytes], home: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await consumer_drained(url, durable):
        assert process.poll() is None, (home / "retrieval.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "the replica did not catch up"
        await asyncio.sleep(0.5)


def start_retrieval(env: dict[str, str], home: Path) -> subprocess.Popen[bytes]:
    log = (home / "retrieval.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "services.retrieval"], cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)


async def wait_for_consumer(url: str, durable: str, timeout_s: float = 60.0) -> None:
    """Until the replica has declared its streams and durable consumer (it is consuming)."""
    connection = await nats.connect(url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await connection.jetstream().consumer_info(stream_for(CHUNKS_EMBEDDED).name, durable)
                return
            except nats.js.errors.NotFoundError:
                assert time.monotonic() < deadline, "retrieval did not start consuming"
                await asyncio.sleep(0.2)
    finally:
        await connection.close()


async def consumer_drained(url: str, durable: str) -> bool:
    connection = await nats.connect(url)
    try:
        info = await connection.jetstream().consumer_info(stream_for(CHUNKS_EMBEDDED).name, durable)
        return info.num_pending == 0 and info.num_ack_pending == 0
    except nats.js.errors.NotFoundError:
        return False
    finally:
        await connection.close()


async def test_kill_9_mid_flow_then_restart_indexes_every_document_once(nats_server: NatsServer, tmp_path: Path) -> None:
    replica = "kill9"
    env = replica_env(nats_server, tmp_path, replica)
    rng = np.random.default_rng(3)
    chunk_counts = rng.integers(1, 4, DOCUMENTS)
    process = start_retrieval(env, tmp_path)
    try:
        await wait_for_consumer(nats_server.url, durable_of(replica))
        connection = await nats.connect(nats_server.url)
        js = connection.jetstream()
        for number, count in enumerate(chunk_counts):
            await js.publish(CHUNKS_EMBEDDED, embedded_message(rng, replica, number, int(count)).SerializeToString())
            if number == DOCUMENTS // 3:
                # Let it index a while, then kill it without warning while messages keep coming.
                await asyncio.sleep(2.0)
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)
                process = start_retrieval(env, tmp_path)
        await connection.close()
        await wait_drained(nats_server.url, durable_of(replica), process, tmp_path, 240)
    finally:
        process.terminate()
        process.wait(timeout=30)
    stored = stored_chunks(tmp_path, replica)
    assert len(stored) == int(chunk_counts.sum())
    assert len({hit.chunk.chunk_id for hit in stored}) == len(stored)
    assert {hit.chunk.document_id for hit in stored} == {f"doc-{n}" for n in range(DOCUMENTS)}


def start_nats(store: Path, port: int, monitor_port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(nats_command(store, "127.0.0.1", port, monitor_port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not port_open("127.0.0.1", port):
        assert process.poll() is None and time.monotonic() < deadline, "nats-server did not start"
        time.sleep(0.05)
    return process


async def publish_retrying(js: nats.js.JetStreamContext, payload: bytes, msg_id: str, timeout_s: float = 60.0) -> None:
    """Publish until JetStream acknowledges; the message id makes a retried publish count once."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await js.publish(CHUNKS_EMBEDDED, payload, headers={"Nats-Msg-Id": msg_id}, timeout=2.0)
            return
        except (nats.errors.Error, asyncio.TimeoutError):
            assert time.monotonic() < deadline, "NATS did not come back"
            await asyncio.sleep(0.2)


async def test_nats_restart_mid_stream_loses_nothing(tmp_path: Path) -> None:
    replica, documents = "natsrestart", 400
    port, monitor_port = free_port(), free_port()
    store = tmp_path / "jetstream"
    server = start_nats(store, port, monitor_port)
    nats_here = NatsServer(f"nats://127.0.0.1:{port}", monitor_port, store)
    process = start_retrieval(replica_env(nats_here, tmp_path, replica), tmp_path)
    rng = np.random.default_rng(5)
    try:
        await wait_for_consumer(nats_here.url, durable_of(replica))
        connection = await nats.connect(nats_here.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js = connection.jetstream()
        for number in range(documents):
            await publish_retrying(js, embedded_message(rng, replica, number, 2).SerializeToString(), f"doc-{number}")
            if number == documents // 2:
                server.terminate()
                server.wait(timeout=15)
                await asyncio.sleep(1.0)
                server = start_nats(store, port, monitor_port)
        await connection.close()
        await wait_drained(nats_here.url, durable_of(replica), process, tmp_path, 180)
    finally:
        process.terminate()
        process.wait(timeout=30)
        server.terminate()
        server.wait(timeout=15)
    stored = stored_chunks(tmp_path, replica)
    assert {hit.chunk.document_id for hit in stored} == {f"doc-{n}" for n in range(documents)}
    assert len(stored) == 2 * documents


BURST = int(os.environ.get("LLMOS_TEST_BURST_DOCUMENTS", "10000"))
# Peak resident memory allowed to the retrieval process through the burst.
BURST_RSS_LIMIT_MB = 1024


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


async def test_a_10000_document_burst_keeps_memory_bounded(nats_server: NatsServer, tmp_path: Path) -> None:
    replica = "burst"
    process = start_retrieval(replica_env(nats_server, tmp_path, replica), tmp_path)
    rng = np.random.default_rng(11)
    try:
        await wait_for_consumer(nats_server.url, durable_of(replica))
        baseline = peak_rss_mb(process.pid)
        connection = await nats.connect(nats_server.url)
        js = connection.jetstream()
        for number in range(BURST):
            await js.publish(CHUNKS_EMBEDDED, embedded_message(rng, replica, number, 1).SerializeToString())
        await connection.close()
        await wait_drained(nats_server.url, durable_of(replica), process, tmp_path, 600)
        peak = peak_rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"retrieval peak RSS through a {BURST}-document burst: {peak:.0f} MB (at start {baseline:.0f} MB)")
    assert peak < BURST_RSS_LIMIT_MB
    assert len(stored_chunks(tmp_path, replica)) == BURST
