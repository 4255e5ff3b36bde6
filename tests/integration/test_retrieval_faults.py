"""Retrieval under faults, each with a retrieval process of its own (own replica name, so
its own index and durable consumers) fed on `llmos.chunks.embedded`:

- kill -9 while the replica's consumer has a backlog (read from JetStream's consumer info) and
  messages in flight, restart: every document indexed, every chunk stored once, and the repeats
  at-least-once delivery allows (indexing redone, `docs.indexed` published again) counted and
  bounded by what was in flight at the crash;
- nats-server SIGKILLed mid-stream, restarted on the same store: nothing lost, nothing stored twice;
- two 10,000-document bursts: the second adds no more memory than a fraction of its bytes.

Each test writes to a tenant named after its replica: a new replica reads the whole stream,
other tests' messages included. Vectors are random unit vectors: this is about delivery and
storage, not relevance. Each prints its figures (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import numpy as np
import pytest

from llmos.bus.subjects import CHUNKS_EMBEDDED, DOCS_INDEXED, stream_for
from llmos.v1 import common_pb2, events_pb2
from llmos.stack import nats_command, port_open
from services.ingest.core import chunk_id
from services.retrieval.index import ChunkFilter, EdgeIndex, Hit
from tests.conftest import NatsServer, free_port, platform_environment, running_nats_server
from tests.fault_helpers import (
    ConsumerLag,
    IndexedPublishes,
    PeakMemory,
    anon_rss_mb,
    consumer_lag,
    messages_on,
    prometheus_count,
    stored_indexed_per_document,
)
from tests.integration.bus_helpers import last_sequence

pytestmark = [pytest.mark.integration, pytest.mark.faults]

DOCUMENTS = int(os.environ.get("LLMOS_TEST_FAULT_DOCUMENTS", "1000"))


def embedded_message(
    rng: np.random.Generator, tenant: str, number: int, chunks: int, version: str = "v1"
) -> events_pb2.ChunksEmbedded:
    document_id = f"doc-{number}"
    message = events_pb2.ChunksEmbedded(document_id=document_id, tenant=tenant, content_hash=version)
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


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server for each test of this module, not the session's: there the test stack's own
    retrieval would index these documents too (every one counted twice), and a backlog of
    thousands of events on replica consumers would stay behind for the modules after it."""
    with running_nats_server(tmp_path / "nats-store") as server:
        yield server


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
        lag = await consumer_lag(connection, CHUNKS_EMBEDDED, durable)
        return lag is not None and lag.outstanding == 0
    finally:
        await connection.close()


# The kill lands while at least this many messages wait undelivered for the replica's consumer.
KILL_PENDING_MIN = DOCUMENTS // 4
# ...and after it has indexed this many documents (it is mid-flow, not starting).
KILL_AFTER_INDEXED = 20
# A killed consumer's outstanding pull requests expire after this (llmos.bus.broker's PullSub
# timeout); after it, the consumer's unacknowledged count is exactly what the crash left in flight.
PULL_EXPIRY_S = 1.0
# Messages the replica's bulk lane pulls at once (services/retrieval/handlers.py): what it may
# take between the last look at its consumer and a crash.
RETRIEVAL_BULK_PULL = 16


def acknowledged(lag: ConsumerLag) -> int:
    """Messages the consumer has acknowledged (before any redelivery)."""
    return lag.delivered - lag.ack_pending


async def lag_to_kill_at(connection: nats.NATS, durable: str, progress: Callable[[ConsumerLag], int], min_pending: int,
                         process: subprocess.Popen[bytes], home: Path, timeout_s: float = 120.0) -> ConsumerLag:
    """Wait until the replica is mid-flow (`progress(lag)` at least KILL_AFTER_INDEXED, messages
    in flight) while its consumer still has `min_pending` undelivered; fails if it caught up first."""
    deadline = time.monotonic() + timeout_s
    while True:
        lag = await consumer_lag(connection, CHUNKS_EMBEDDED, durable)
        assert process.poll() is None, (home / "retrieval.log").read_text()[-2000:]
        if lag is not None:
            assert lag.pending >= min_pending, f"the replica caught up before the kill could land mid-flow: {lag}"
            if progress(lag) >= KILL_AFTER_INDEXED and lag.ack_pending > 0:
                return lag
        assert time.monotonic() < deadline, f"the replica made no progress: {lag}"
        await asyncio.sleep(0.02)


async def test_kill_9_while_the_consumer_lags_indexes_every_document_with_bounded_repeats(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """SIGKILL while the consumer has most of the flow pending and messages in flight; restarted,
    every document is indexed, every chunk stored once. Delivery is at-least-once: only the
    messages in flight at the crash (delivered, not acknowledged) may be indexed again, so the
    repeated `docs.indexed` publishes and the redeliveries are bounded by that count, and the
    stream keeps one event per document (the publish's message id, inside the duplicate window)."""
    replica = "kill9"
    durable = durable_of(replica)
    env = replica_env(nats_server, tmp_path, replica)
    rng = np.random.default_rng(3)
    chunk_counts = rng.integers(1, 4, DOCUMENTS)
    # Built beforehand, so publishing outpaces indexing and the consumer's backlog is real.
    payloads = [embedded_message(rng, replica, number, int(count)).SerializeToString() for number, count in enumerate(chunk_counts)]
    connection = await nats.connect(nats_server.url)
    publishes = IndexedPublishes(replica)
    await publishes.subscribe(connection)
    js = connection.jetstream()
    process = start_retrieval(env, tmp_path)
    try:
        await wait_for_consumer(nats_server.url, durable)
        events_before = await last_sequence(nats_server.url, DOCS_INDEXED)
        first = DOCUMENTS * 2 // 3
        for payload in payloads[:first]:
            await js.publish(CHUNKS_EMBEDDED, payload)
        at_kill = await lag_to_kill_at(connection, durable, lambda _: len(publishes.per_document), KILL_PENDING_MIN, process, tmp_path)
        indexed_at_kill = len(publishes.per_document)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        await asyncio.sleep(PULL_EXPIRY_S + 1.0)
        in_flight = await consumer_lag(connection, CHUNKS_EMBEDDED, durable)
        assert in_flight is not None
        for payload in payloads[first:]:  # the flow goes on while the replica is down
            await js.publish(CHUNKS_EMBEDDED, payload)
        restarted = time.monotonic()
        process = start_retrieval(env, tmp_path)
        await wait_drained(nats_server.url, durable, process, tmp_path, 240)
        recovery_s = time.monotonic() - restarted
        drained = await consumer_lag(connection, CHUNKS_EMBEDDED, durable)
        assert drained is not None
        deliveries_owed = await messages_on(connection, CHUNKS_EMBEDDED)
        await asyncio.sleep(0.5)  # the last events reach the subscriber
    finally:
        await connection.close()
        process.terminate()
        process.wait(timeout=30)
    stored = stored_chunks(tmp_path, replica)
    kept = await stored_indexed_per_document(nats_server.url, replica, events_before)
    redeliveries = drained.delivered - deliveries_owed
    print(
        f"kill -9 of retrieval with {at_kill.pending} pending and {at_kill.ack_pending} unacknowledged "
        f"({indexed_at_kill} of {DOCUMENTS} documents indexed); in flight at the crash: {in_flight.ack_pending}; "
        f"restarted, drained in {recovery_s:.1f} s; redeliveries {redeliveries}, repeated docs.indexed publishes "
        f"{publishes.repeats}, documents with more than one stored event {sum(n > 1 for n in kept.values())}"
    )
    assert at_kill.pending >= KILL_PENDING_MIN
    assert len(stored) == int(chunk_counts.sum())
    assert len({hit.chunk.chunk_id for hit in stored}) == len(stored)
    assert {hit.chunk.document_id for hit in stored} == {f"doc-{n}" for n in range(DOCUMENTS)}
    assert set(publishes.per_document) == {f"doc-{n}" for n in range(DOCUMENTS)}
    assert 0 <= redeliveries <= in_flight.ack_pending
    assert publishes.repeats <= in_flight.ack_pending, publishes.per_document.most_common(5)
    assert kept == {f"doc-{n}": 1 for n in range(DOCUMENTS)}, [d for d, n in kept.items() if n != 1][:5]


def start_nats(store: Path, port: int, monitor_port: int) -> subprocess.Popen[bytes]:
    """nats-server on `store`, its log (recovery included) appended beside the store."""
    with (store.parent / "nats.log").open("ab") as log:
        process = subprocess.Popen(nats_command(store, "127.0.0.1", port, monitor_port), stdout=log, stderr=subprocess.STDOUT)
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


async def wait_for_jetstream(connection: nats.NATS, timeout_s: float = 60.0) -> None:
    """Until the restarted server answers for the chunks stream (JetStream recovered its store)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await connection.jetstream().stream_info(stream_for(CHUNKS_EMBEDDED).name)
            return
        except (nats.errors.Error, asyncio.TimeoutError):
            assert time.monotonic() < deadline, "JetStream did not come back"
            await asyncio.sleep(0.05)


async def test_nats_crash_mid_stream_recovers_from_its_store_and_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL of nats-server (no shutdown, nothing flushed by it) while the replica's consumer
    has a backlog; restarted on the same store, JetStream recovers the stream and the consumer
    from disk: every acknowledged publish is there, the publisher's retries count once (the
    deduplication window is rebuilt from the store), every document is indexed and the stream
    keeps one `docs.indexed` event per document. Repeated indexing (at-least-once) is counted
    from the replica's own publish counter, which lives through the crash with the replica.

    A crash can cost the consumer acknowledgements it had taken but not yet written to its store
    (measured here: up to every message delivered before the crash), so the bound is the
    deliveries before the crash plus one pull batch, each indexed at most once more."""
    replica, documents = "natscrash", 400
    port, monitor_port = free_port(), free_port()
    store = tmp_path / "jetstream"
    server = start_nats(store, port, monitor_port)
    nats_here = NatsServer(f"nats://127.0.0.1:{port}", monitor_port, store)
    env = replica_env(nats_here, tmp_path, replica)
    process = start_retrieval(env, tmp_path)
    durable = durable_of(replica)
    rng = np.random.default_rng(5)
    payloads = [embedded_message(rng, replica, number, 2).SerializeToString() for number in range(documents)]
    try:
        await wait_for_consumer(nats_here.url, durable)
        connection = await nats.connect(nats_here.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js = connection.jetstream()
        first = documents // 2
        for number in range(first):
            await publish_retrying(js, payloads[number], f"doc-{number}")
        at_crash = await lag_to_kill_at(connection, durable, acknowledged, documents // 8, process, tmp_path)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=15)
        await asyncio.sleep(1.0)
        restarted = time.monotonic()
        server = start_nats(store, port, monitor_port)
        await wait_for_jetstream(connection)
        jetstream_back_s = time.monotonic() - restarted
        recovered_messages = await messages_on(connection, CHUNKS_EMBEDDED)
        # The last publishes again, as a publisher unsure of its acknowledgements would: dropped.
        for number in range(first - 10, documents):
            await publish_retrying(js, payloads[number], f"doc-{number}")
        await wait_drained(nats_here.url, durable, process, tmp_path, 180)
        drained_s = time.monotonic() - restarted
        stream_messages = await messages_on(connection, CHUNKS_EMBEDDED)
        await connection.close()
        indexing_publishes = prometheus_count(
            env["LLMOS_RETRIEVAL_METRICS_ADDR"], "messaging_client_operation_duration_seconds",
            messaging_destination_name=DOCS_INDEXED,
        )
        kept = await stored_indexed_per_document(nats_here.url, replica)
    finally:
        process.terminate()
        process.wait(timeout=30)
        server.terminate()
        server.wait(timeout=15)
    stored = stored_chunks(tmp_path, replica)
    repeats = int(indexing_publishes) - documents
    print(
        f"nats-server SIGKILLed with {at_crash.pending} pending, {at_crash.delivered} delivered, {at_crash.ack_pending} unacknowledged "
        f"({first} of {documents} published); JetStream back {jetstream_back_s:.2f} s after restart with "
        f"{recovered_messages} messages; drained {drained_s:.1f} s after restart; repeated indexing {repeats} "
        f"(docs.indexed publishes {int(indexing_publishes)} for {documents} documents)"
    )
    assert at_crash.pending >= documents // 8
    assert recovered_messages == first
    assert stream_messages == documents
    assert {hit.chunk.document_id for hit in stored} == {f"doc-{n}" for n in range(documents)}
    assert len(stored) == 2 * documents
    assert kept == {f"doc-{n}": 1 for n in range(documents)}, [d for d, n in kept.items() if n != 1][:5]
    assert 0 <= repeats <= at_crash.delivered + RETRIEVAL_BULK_PULL


BURST = int(os.environ.get("LLMOS_TEST_BURST_DOCUMENTS", "10000"))
# Resident memory a burst may add once the index holds its documents, as a share of the burst's
# bytes on the wire: keeping even a quarter of the messages (or their decoded vectors, larger
# in Python than on the wire) fails it.
BURST_GROWTH_SHARE = 0.25


async def publish_burst(js: nats.js.JetStreamContext, payloads: list[bytes]) -> None:
    for payload in payloads:
        await js.publish(CHUNKS_EMBEDDED, payload)


async def test_a_10000_document_burst_adds_no_memory_once_the_index_holds_it(nats_server: NatsServer, tmp_path: Path) -> None:
    """Two bursts of the same 10,000 documents: the first fills the index (its peak is reported),
    the second re-submits every document as a new version, so the index keeps the same points
    and whatever resident memory the second burst adds is what the process kept of the data.
    Measured on anonymous memory (heap and arenas), sampled through the burst: the index's
    memory-mapped files are the kernel's to page, not a leak."""
    replica = "burst"
    durable = durable_of(replica)
    process = start_retrieval(replica_env(nats_server, tmp_path, replica), tmp_path)
    rng = np.random.default_rng(11)
    versions = [[embedded_message(rng, replica, number, 1, version).SerializeToString() for number in range(BURST)]
                for version in ("v1", "v2")]
    burst_mb = sum(map(len, versions[1])) / 1e6
    try:
        await wait_for_consumer(nats_server.url, durable)
        at_start = anon_rss_mb(process.pid)
        memory = PeakMemory(process.pid)
        connection = await nats.connect(nats_server.url)
        try:
            js = connection.jetstream()
            started = time.monotonic()
            await publish_burst(js, versions[0])
            await wait_drained(nats_server.url, durable, process, tmp_path, 600)
            first_s = time.monotonic() - started
            first_peak = memory.peak
            settled = memory.reset()
            await publish_burst(js, versions[1])
            await wait_drained(nats_server.url, durable, process, tmp_path, 600)
            second_peak, after = memory.peak, anon_rss_mb(process.pid)
        finally:
            memory.stop()
            await connection.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    growth, bound = second_peak - settled, BURST_GROWTH_SHARE * burst_mb
    print(
        f"retrieval anonymous RSS: {at_start:.0f} MB at start, peak {first_peak:.0f} MB through the first "
        f"{BURST}-document burst ({first_s:.0f} s), {settled:.0f} MB after it; second burst ({burst_mb:.1f} MB "
        f"on the wire): peak {second_peak:.0f} MB, {after:.0f} MB after, growth {growth:.1f} MB (bound {bound:.1f} MB)"
    )
    assert growth < bound
    stored = stored_chunks(tmp_path, replica)
    assert len(stored) == BURST and {hit.content_hash for hit in stored} == {"v2"}
