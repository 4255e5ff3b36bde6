"""What the fault tests measure, from real interfaces: a durable consumer's lag (JetStream's
consumer info), every `docs.indexed` publish per document (a core NATS subscription sees each
publish, including those the stream drops as duplicates), the events the stream kept, a
service's Prometheus counters, and a process's anonymous resident memory (/proc)."""

from __future__ import annotations

import threading
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from prometheus_client.parser import text_string_to_metric_families

from llmos.bus.subjects import DOCS_INDEXED, stream_for
from llmos.v1 import events_pb2


@dataclass(frozen=True)
class ConsumerLag:
    """A durable consumer as JetStream counts it."""

    pending: int  # in the stream, not yet delivered
    ack_pending: int  # delivered, not acknowledged: redelivered if the consumer dies
    delivered: int  # deliveries so far, redeliveries included (the consumer sequence)
    acked_stream_seq: int  # stream sequence below which everything is acknowledged

    @property
    def outstanding(self) -> int:
        return self.pending + self.ack_pending


async def consumer_lag(connection: Client, subject: str, durable: str) -> ConsumerLag | None:
    """The lag of `durable` on `subject`'s stream; None while it does not exist."""
    try:
        info = await connection.jetstream().consumer_info(stream_for(subject).name, durable)
    except NotFoundError:
        return None
    return ConsumerLag(
        pending=info.num_pending or 0,
        ack_pending=info.num_ack_pending or 0,
        delivered=info.delivered.consumer_seq if info.delivered else 0,
        acked_stream_seq=info.ack_floor.stream_seq if info.ack_floor else 0,
    )


async def messages_on(connection: Client, subject: str) -> int:
    """How many messages `subject`'s stream holds on `subject`."""
    info = await connection.jetstream().stream_info(stream_for(subject).name, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


class IndexedPublishes:
    """Every `docs.indexed` publish for one tenant, per document, as a core subscriber sees
    them: a repeated indexing shows up here even when JetStream drops the repeated event."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.per_document: Counter[str] = Counter()

    async def subscribe(self, connection: Client) -> None:
        async def on_event(msg: Msg) -> None:
            event = events_pb2.DocumentIndexed.FromString(msg.data)
            if event.tenant == self.tenant:
                self.per_document[event.document_id] += 1

        await connection.subscribe(DOCS_INDEXED, cb=on_event)

    @property
    def repeats(self) -> int:
        """Publishes beyond the first of each document."""
        return sum(count - 1 for count in self.per_document.values())


async def stored_indexed_per_document(nats_url: str, tenant: str, after_seq: int = 0) -> Counter[str]:
    """`docs.indexed` events the DOCS stream kept for `tenant` after `after_seq`, per document."""
    connection = await nats.connect(nats_url)
    stored: Counter[str] = Counter()
    try:
        js = connection.jetstream()
        stream = stream_for(DOCS_INDEXED).name
        try:
            last = (await js.get_last_msg(stream, DOCS_INDEXED)).seq
        except NotFoundError:
            return stored
        for seq in range(after_seq + 1, last + 1):
            try:
                message = await js.get_msg(stream, seq)
            except NotFoundError:
                continue
            if message.subject == DOCS_INDEXED:
                event = events_pb2.DocumentIndexed.FromString(message.data)
                if event.tenant == tenant:
                    stored[event.document_id] += 1
        return stored
    finally:
        await connection.close()


def prometheus_count(listen: str, family: str, **labels: str) -> float:
    """The sum of `family`'s `_count` samples carrying `labels` on a service's metrics port."""
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for metric in text_string_to_metric_families(text):
        if metric.name != family:
            continue
        for sample in metric.samples:
            if sample.name == f"{family}_count" and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def anon_rss_mb(pid: int | str = "self") -> float:
    """Anonymous resident memory (heap, arenas): where retained data lives. File-backed pages
    (an index's memory-mapped segments, shared libraries) are left out: the kernel drops them
    at will and they are not a leak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


class PeakMemory:
    """Samples a process's anonymous resident memory every `interval_s` on a thread; `peak`
    is the highest seen since the last `reset`."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self._pid = pid
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.peak = anon_rss_mb(pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                now = anon_rss_mb(self._pid)
            except (FileNotFoundError, ProcessLookupError, AssertionError):
                return
            with self._lock:
                self.peak = max(self.peak, now)

    def reset(self) -> float:
        """Start a new peak from the current figure; returns it."""
        with self._lock:
            self.peak = anon_rss_mb(self._pid)
            return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
