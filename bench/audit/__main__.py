"""`make bench-audit`: audit records/s with the keyed (HMAC-SHA256) chain on, the store alone and through the bus.

Store alone (in-process, a temporary SQLite file in WAL mode): `AuditStore.append`, one
transaction per event as the service does it, against the reference of the same rows inserted
into the same kind of table without the chain (no previous-hash lookup, no hash); then
`verify` walking the whole chain.

Through the bus: a private nats-server and the audit service as a real process. N events wait
in the AUDIT stream while the service is down (losing it must lose nothing), then the service
starts and drains them; then N more are published while it runs (publish → stored). A bare
JetStream consumer that only acknowledges the same 2N messages is the transport's ceiling in the
same run. Every stored record is checked by the service's own Verify.

    python -m bench.audit [--events 5000] [--store-events 20000]

Writes bench/results/audit.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import nats
from nats.js.api import AckPolicy, ConsumerConfig

from bench.common import free_port, settings_from
from bench.inference.service import REPO, print_table, write_results
from llmos.audit import ALLOW, DENY, audit_event
from llmos.bus.codec import encode
from llmos.crypto import new_key_entry
from llmos.clients import AuditClient
from llmos.bus.subjects import AUDIT_ALL, audit_subject, stream_for
from llmos.settings import SERVICE_NAMES
from llmos.stack import nats_command, port_open, stop_pids, wait_until_serving
from llmos.v1 import audit_pb2, events_pb2
from services.audit.chain import ChainKeys
from services.audit.core import AuditStore

BENCH_KEY = "bench-key"
METADATA = (("authorization", f"Bearer {BENCH_KEY}"),)
PUBLISH_WINDOW = 256  # publishes in flight before waiting for their acks


def events(count: int) -> list[events_pb2.AuditEvent]:
    """Events shaped like the platform's: a search, a document read, an occasional denial."""
    out = []
    for index in range(count):
        tenant = ("acme", "globex", "initech")[index % 3]
        denied = index % 50 == 0
        out.append(audit_event(
            ("retrieval", "ingest", "dialogue")[index % 3], f"user-{index % 97}", tenant,
            ("retrieval.Search", "ingest.SubmitDocument", "dialogue.Chat")[index % 3],
            f"document/{tenant}-kb-{index % 1000}", DENY if denied else ALLOW, "missing permission search" if denied else "",
        ))
    return out


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


# -- the store alone ---------------------------------------------------------------------------


def plain_inserts(path: Path, batch: list[events_pb2.AuditEvent]) -> float:
    """The reference: the same rows and pragmas, one transaction each, no chain."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE records (sequence INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, time_ns INTEGER NOT NULL, "
        "tenant TEXT NOT NULL, principal TEXT NOT NULL, action TEXT NOT NULL, event BLOB NOT NULL)"
    )
    db.execute("CREATE INDEX records_by_tenant_time ON records (tenant, time_ns)")
    started = time.perf_counter()
    for event in batch:
        db.execute(
            "INSERT INTO records (event_id, time_ns, tenant, principal, action, event) VALUES (?, ?, ?, ?, ?, ?)",
            (event.event_id, event.time.ToNanoseconds(), event.tenant, event.principal, event.action, encode(event)),
        )
    elapsed = time.perf_counter() - started
    db.close()
    return elapsed


def bench_store(count: int, folder: Path) -> dict[str, float]:
    batch = events(count)
    reference_s = plain_inserts(folder / "plain.sqlite3", batch)
    store = AuditStore(folder / "chained.sqlite3", ChainKeys.from_spec(new_key_entry()), folder / "checkpoint.json")
    started = time.perf_counter()
    for event in batch:
        store.append(event, "bench")
    chained_s = time.perf_counter() - started
    started = time.perf_counter()
    verification = store.verify()
    verify_s = time.perf_counter() - started
    store.close()
    assert verification.intact and verification.records_checked == count, verification
    return {
        "events": count,
        "chained_records_per_s": rate(count, chained_s),
        "plain_insert_records_per_s": rate(count, reference_s),
        "chained_vs_plain": reference_s / chained_s,
        "verify_records_per_s": rate(count, verify_s),
    }


# -- through the bus ---------------------------------------------------------------------------


class AuditStack:
    """A private nats-server and the audit service, which can be stopped and started again."""

    def __init__(self, home: Path) -> None:
        self.home = home
        (home / "logs").mkdir(parents=True)
        port = free_port()
        self.url = f"nats://127.0.0.1:{port}"
        self.nats = subprocess.Popen(nats_command(home / "jetstream", "127.0.0.1", port, free_port()),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not port_open("127.0.0.1", port):
            time.sleep(0.05)
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("LLMOS_")}
        self.env.update({f"LLMOS_{name.upper()}_ADDR": f"127.0.0.1:{free_port()}" for name in SERVICE_NAMES})
        self.env.update({"LLMOS_HOME": str(home), "LLMOS_NATS_URL": self.url, "LLMOS_LOG_LEVEL": "WARNING",
                         "LLMOS_API_KEYS": f"{BENCH_KEY}=bench:bench:admin",
                         "LLMOS_AUDIT_CHAIN_KEYS": new_key_entry(), "PYTHONPATH": str(REPO)})
        self.settings = settings_from(self.env)
        self.service: subprocess.Popen[bytes] | None = None

    @property
    def db(self) -> Path:
        return self.settings.data_dir / "audit.sqlite3"

    def start(self) -> None:
        with (self.home / "logs" / "audit.log").open("ab") as log:
            self.service = subprocess.Popen([sys.executable, "-m", "services.audit"], cwd=self.home, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT)
        wait_until_serving(self.settings, {"audit": self.service}, timeout_s=120)

    def stop_service(self) -> None:
        if self.service:
            stop_pids([self.service.pid], timeout_s=15)
            self.service = None

    def stop(self) -> None:
        self.stop_service()
        self.nats.terminate()
        self.nats.wait(timeout=10)

    def stored(self) -> int:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM audit_records").fetchone()[0])


@contextmanager
def audit_stack() -> Iterator[AuditStack]:
    with tempfile.TemporaryDirectory(prefix="llmos-bench-audit-") as folder:
        stack = AuditStack(Path(folder))
        try:
            yield stack
        finally:
            stack.stop()


async def publish(url: str, batch: list[events_pb2.AuditEvent]) -> float:
    """Seconds to publish `batch` on the bench service's audit subject, every ack received."""
    connection = await nats.connect(url)
    js = connection.jetstream()
    started = time.perf_counter()
    for offset in range(0, len(batch), PUBLISH_WINDOW):
        await asyncio.gather(*(
            js.publish(audit_subject("bench"), encode(event), headers={"Nats-Msg-Id": event.event_id})
            for event in batch[offset:offset + PUBLISH_WINDOW]
        ))
    elapsed = time.perf_counter() - started
    await connection.close()
    return elapsed


async def wait_stored(stack: AuditStack, wanted: int, timeout_s: float = 600.0) -> tuple[float, float]:
    """(time the first new record appeared, time `wanted` records were stored), perf_counter clock."""
    before = stack.stored() if stack.db.exists() else 0
    first, deadline = 0.0, time.perf_counter() + timeout_s
    while True:
        stored = stack.stored() if stack.db.exists() else 0
        now = time.perf_counter()
        if stored > before and not first:
            first = now
        if stored >= wanted:
            return first or now, now
        if now > deadline:
            raise TimeoutError(f"{stored} of {wanted} audit records stored within {timeout_s:.0f} s")
        await asyncio.sleep(0.01)


async def bare_consumer(url: str, count: int) -> float:
    """Seconds for a JetStream pull consumer that only acknowledges to take `count` messages."""
    connection = await nats.connect(url)
    js = connection.jetstream()
    stream = stream_for(AUDIT_ALL.replace(">", "bench")).name
    subscription = await js.pull_subscribe(
        AUDIT_ALL, durable=f"bench-{uuid.uuid4().hex[:6]}", stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
    )
    taken, started = 0, time.perf_counter()
    while taken < count:
        for message in await subscription.fetch(64, timeout=5):
            await message.ack()
            taken += 1
    elapsed = time.perf_counter() - started
    await connection.close()
    return elapsed


async def verify(stack: AuditStack) -> audit_pb2.VerifyAuditResponse:
    async with grpc.aio.insecure_channel(stack.settings.audit_addr) as channel:
        return await AuditClient(channel, METADATA).verify(timeout_s=300)


async def bench_bus(count: int) -> dict[str, float]:
    with audit_stack() as stack:
        stack.start()  # declares the AUDIT stream and the service's durable consumer
        baseline = stack.stored()  # its own start-up records, if any
        stack.stop_service()

        backlog = events(count)
        publish_backlog_s = await publish(stack.url, backlog)
        stack.start()
        first, done = await wait_stored(stack, baseline + count)
        drain_s = done - first

        live = events(count)
        waiting = asyncio.create_task(wait_stored(stack, stack.stored() + count))
        started = time.perf_counter()
        publish_live_s = await publish(stack.url, live)
        _, done = await waiting
        live_s = done - started

        verification = await verify(stack)
        # Verify is audited too, so its own record may land after the walk: at least, not exactly, what was stored.
        assert verification.intact and verification.records_checked >= baseline + 2 * count, verification
        bare_s = await bare_consumer(stack.url, 2 * count)
    return {
        "events": count,
        "publish_records_per_s": rate(count, publish_backlog_s),
        "backlog_drain_records_per_s": rate(count, drain_s),
        "live_publish_to_stored_records_per_s": rate(count, live_s),
        "live_publish_records_per_s": rate(count, publish_live_s),
        "bare_consumer_records_per_s": rate(2 * count, bare_s),
        "drain_vs_bare_consumer": rate(count, drain_s) / rate(2 * count, bare_s),
        "records_verified": float(verification.records_checked),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000, help="events per bus phase (backlog, live)")
    parser.add_argument("--store-events", type=int, default=20000, help="events appended to the store alone")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmos-bench-audit-store-") as folder:
        store = bench_store(args.store_events, Path(folder))
    bus = asyncio.run(bench_bus(args.events))

    print_table(
        f"Audit store alone ({store['events']:.0f} events, SQLite WAL, one transaction per event)",
        ("path", "records/s", "vs plain insert"),
        [
            ("append with SHA-256 chain", f"{store['chained_records_per_s']:,.0f}", f"{store['chained_vs_plain']:.2f}x"),
            ("plain insert (reference)", f"{store['plain_insert_records_per_s']:,.0f}", "1.00x"),
            ("verify (walk the chain)", f"{store['verify_records_per_s']:,.0f}", ""),
        ],
    )
    print_table(
        f"Audit through the bus ({bus['events']:.0f} events per phase, chain on, {bus['records_verified']:.0f} records verified)",
        ("phase", "records/s", "vs bare consumer"),
        [
            ("publish on llmos.audit.bench (acked)", f"{bus['publish_records_per_s']:,.0f}", ""),
            ("backlog drained by the audit service", f"{bus['backlog_drain_records_per_s']:,.0f}", f"{bus['drain_vs_bare_consumer']:.2f}x"),
            ("live: publish -> stored and chained", f"{bus['live_publish_to_stored_records_per_s']:,.0f}", ""),
            ("bare JetStream consumer, ack only (reference)", f"{bus['bare_consumer_records_per_s']:,.0f}", "1.00x"),
        ],
    )
    path = write_results("audit", {"store": store, "bus": bus, "cpu_count": os.cpu_count() or 0})
    print(f"\nwrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
