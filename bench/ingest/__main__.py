"""`make bench-ingest`: the live knowledge base under load, end to end.

A private nats-server with the ingest, tokenizer, inference and retrieval services as real
processes. A bulk load of documents (~2 KB each, SciFact abstracts) is published on
`llmos.ingest.requested` at batch priority; documents/s is publish → last `docs.indexed`.
While it runs, single documents are published at interactive priority, one at a time, and each
one's publish → searchable latency (until RetrievalService.Search returns it) is recorded.

Where the bulk load's time went, per stage, is read from what the services export to anyone on
their Prometheus ports (LLMOS_<SERVICE>_METRICS_ADDR), scraped before and after the load:
`llmos.ingest.stage.duration` (extract, redact, tokenize, chunk, status, publish, audit),
`llmos.inference.embed.duration` (model calls), `llmos.retrieval.index.duration` (encode, store),
the bus's `messaging.process.duration` per service and subject and `messaging.client.operation.duration`
(publishes); with each process's CPU seconds (its worker processes included) and the load window.

    python -m bench.ingest [--documents 200] [--full] [--live 20] [--set LLMOS_NAME=VALUE ...]

`--full` is the issue's size, 1,000 documents. Writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
import nats
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.common import LoadWindow, _process_tree_cpu_s, free_port, settings_from
from llmos.assertions import service_key_environment
from llmos.bus.follow import follow, last_sequence
from llmos.bus.subjects import CHUNKS_CREATED, CHUNKS_EMBEDDED, DOCS_INDEXED, INGEST_REQUESTED
from llmos.clients import RetrievalClient
from llmos.crypto import new_key_entry
from llmos.settings import SERVICE_NAMES
from llmos.stack import nats_command, port_open, stop_pids, wait_until_serving
from llmos.v1 import common_pb2, events_pb2, retrieval_pb2

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results" / "ingest.json"
CORPUS = REPO.parent / "shared" / "data" / "scifact" / "corpus.jsonl"
SERVICES = ("tokenizer", "inference", "retrieval", "ingest")
BENCH_KEY = "bench-key"
METADATA = (("authorization", f"Bearer {BENCH_KEY}"),)
TENANT = "bench"
TARGET_BYTES = 2048


def documents(count: int) -> list[tuple[str, str]]:
    """(title, ~2 KB text) pairs from the SciFact corpus, neighbouring abstracts joined."""
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    out, position = [], 0
    while len(out) < count:
        title, text = rows[position % len(rows)]["title"], ""
        while len(text.encode()) < TARGET_BYTES:
            text += " " + rows[position % len(rows)]["text"]
            position += 1
        out.append((title, text.encode()[:TARGET_BYTES].decode("utf-8", "ignore")))
    return out


class PrivateStack:
    """nats-server and the four services of the live flow, in a temporary home."""

    def __init__(self, home: Path, models_home: Path, overrides: dict[str, str]) -> None:
        (home / "models").symlink_to(models_home.resolve() / "models", target_is_directory=True)
        (home / "logs").mkdir()
        self.home = home
        port = free_port()
        self.nats = subprocess.Popen(nats_command(home / "jetstream", "127.0.0.1", port, free_port()),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not port_open("127.0.0.1", port):
            time.sleep(0.05)
        env = {key: value for key, value in os.environ.items() if not key.startswith("LLMOS_")}
        env.update({f"LLMOS_{name.upper()}_ADDR": f"127.0.0.1:{free_port()}" for name in SERVICE_NAMES})
        self.metrics_addrs = {name: f"127.0.0.1:{free_port()}" for name in SERVICES}
        env.update({f"LLMOS_{name.upper()}_METRICS_ADDR": addr for name, addr in self.metrics_addrs.items()})
        # Chunk text is sealed at rest as in production: a fresh data key for this throwaway stack.
        env.update({"LLMOS_HOME": str(home), "LLMOS_ENCRYPTION_KEYS": new_key_entry("bench"), "LLMOS_NATS_URL": f"nats://127.0.0.1:{port}", "LLMOS_LOG_LEVEL": "WARNING",
                    "LLMOS_API_KEYS": f"{BENCH_KEY}=bench:{TENANT}:admin", **service_key_environment(),
                    "PYTHONPATH": str(REPO), **overrides})
        self.settings = settings_from(env)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        for name in SERVICES:
            with (home / "logs" / f"{name}.log").open("wb") as log:
                self.processes[name] = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=home, env=env,
                                                        stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_serving(self.settings, self.processes, timeout_s=180)
        except BaseException:
            self.stop()  # a service that failed to start leaves no others running
            raise

    def peak_rss_mb(self) -> dict[str, float]:
        """Each service's peak resident memory so far (VmHWM)."""
        peaks = {}
        for name, process in self.processes.items():
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks[name] = int(line.split()[1]) / 1024
        return peaks

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds each service (with its worker processes) and nats-server used so far."""
        return {name: _process_tree_cpu_s(process.pid) for name, process in {**self.processes, "nats": self.nats}.items()}

    def metric_totals(self) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[float, float]]:
        """(service, histogram, labels) → (count, sum) of every histogram the services export now."""
        totals: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for service, addr in self.metrics_addrs.items():
            with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as response:
                text = response.read().decode()
            for family in text_string_to_metric_families(text):
                if family.type != "histogram":
                    continue
                for sample in family.samples:
                    suffix = sample.name.removeprefix(family.name)
                    if suffix not in ("_count", "_sum"):
                        continue
                    labels = tuple(sorted((key, value) for key, value in sample.labels.items()
                                          if not key.startswith("otel_scope") and key != "le"))
                    totals[(service, family.name, labels)][suffix == "_sum"] += sample.value
        return {key: (count, total) for key, (count, total) in totals.items()}

    def stop(self) -> None:
        stop_pids([process.pid for process in self.processes.values()], timeout_s=15)
        self.nats.terminate()
        self.nats.wait(timeout=10)


async def wait_indexed(js: nats.js.JetStreamContext, after_seq: int, wanted: set[str], timeout_s: float) -> float:
    """Seconds until every document in `wanted` has a `docs.indexed` event after `after_seq`."""
    started, pending = time.perf_counter(), set(wanted)
    try:
        async with asyncio.timeout(timeout_s):
            async for message in follow(js, DOCS_INDEXED, after_seq):
                pending.discard(events_pb2.DocumentIndexed.FromString(message.data).document_id)
                if not pending:
                    break
    except TimeoutError:
        raise TimeoutError(f"{len(pending)} documents not indexed within {timeout_s:.0f} s") from None
    return time.perf_counter() - started


# The stages a live document passes, each seen as the event its stage publishes.
STAGES = ((CHUNKS_CREATED, events_pb2.ChunksCreated, "chunked"), (CHUNKS_EMBEDDED, events_pb2.ChunksEmbedded, "embedded"),
          (DOCS_INDEXED, events_pb2.DocumentIndexed, "indexed"))


async def watch_stages(connection: nats.NATS, seen: dict[tuple[str, str], float]) -> None:
    """Record when each live document's stage event goes by (plain NATS subscribers see JetStream publishes)."""
    for subject, message_type, stage in STAGES:
        async def on_event(message: nats.aio.msg.Msg, message_type: type = message_type, stage: str = stage) -> None:
            document_id = message_type.FromString(message.data).document_id
            if document_id.startswith("live-"):
                seen.setdefault((document_id, stage), time.perf_counter())
        await connection.subscribe(subject, cb=on_event)


MetricTotals = dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[float, float]]
_INGEST_STAGES = {"extract": "extract", "extract.wait": "extract", "redact": "redact", "tokenize": "tokenize/chunk",
                  "chunk": "tokenize/chunk", "status": "events", "publish": "events", "audit": "events"}


def _stage_of(histogram: str, labels: dict[str, str]) -> str:
    """The issue's stage a histogram row belongs to; `handler` rows are whole bus handlers (they overlap the stages)."""
    if histogram == "llmos_ingest_stage_duration_seconds":
        return _INGEST_STAGES.get(labels.get("llmos_ingest_stage", ""), "other")
    if histogram == "llmos_inference_embed_duration_seconds":
        return "embed"
    if histogram == "llmos_retrieval_index_duration_seconds":
        return "upsert"
    if histogram == "messaging_client_operation_duration_seconds":
        return "events"
    if histogram == "messaging_process_duration_seconds":
        return "handler"
    return "other"


def stage_profile(before: MetricTotals, after: MetricTotals, documents: int) -> list[dict[str, object]]:
    """Each histogram row that moved during the bulk load: its stage, calls, seconds, and ms per bulk document.

    Seconds are wall time summed over calls: stages run concurrently, so they add up to more than the
    elapsed time; the CPU seconds per process say where the cores went."""
    rows = []
    for (service, histogram, labels), (count, total) in sorted(after.items()):
        count_before, total_before = before.get((service, histogram, labels), (0.0, 0.0))
        if count - count_before <= 0:
            continue
        named = dict(labels)
        what = histogram.removesuffix("_seconds") + "".join(
            f" {value}" for key, value in labels if key in ("llmos_ingest_stage", "step", "messaging_destination_name", "priority",
                                                              "llmos_bus_outcome"))
        rows.append({"stage": _stage_of(histogram, named), "service": service, "what": what, "calls": int(count - count_before),
                     "seconds": total - total_before, "ms_per_document": (total - total_before) * 1000 / documents})
    order = ("extract", "redact", "tokenize/chunk", "embed", "upsert", "events", "handler", "other")
    return sorted(rows, key=lambda row: (order.index(str(row["stage"])), str(row["service"]), -float(row["seconds"])))  # type: ignore[arg-type]


async def measure(stack: PrivateStack, bulk_count: int, live_count: int, timeout_s: float) -> dict[str, object]:
    connection = await nats.connect(stack.settings.nats_url)
    js = connection.jetstream()
    seen: dict[tuple[str, str], float] = {}
    await watch_stages(connection, seen)
    start_seq = await last_sequence(js, DOCS_INDEXED)
    channel = grpc.aio.insecure_channel(stack.settings.service_addr("retrieval"))
    retrieval = RetrievalClient(channel, METADATA)
    try:
        bulk = documents(bulk_count)
        metrics_before, cpu_before, load = stack.metric_totals(), stack.cpu_seconds(), LoadWindow()
        started = time.perf_counter()
        for number, (title, text) in enumerate(bulk):
            document = events_pb2.DocumentSubmitted(document_id=f"bulk-{number}", tenant=TENANT, title=title,
                                                    content=text.encode(), priority=common_pb2.PRIORITY_BATCH)
            document.submitted_at.GetCurrentTime()
            await js.publish(INGEST_REQUESTED, document.SerializeToString())
        bulk_done = asyncio.create_task(wait_indexed(js, start_seq, {f"bulk-{n}" for n in range(bulk_count)}, timeout_s))
        latencies, stage_ms = [], {stage: [] for _, _, stage in STAGES}
        for number in range(live_count):
            if bulk_done.done():
                break
            document_id = f"live-{number}"
            document = events_pb2.DocumentSubmitted(
                document_id=document_id, tenant=TENANT, title="Store notice", priority=common_pb2.PRIORITY_INTERACTIVE,
                content=f"Notice {number}: the Lindenstrasse store opens late on day {number} for stocktaking.".encode(),
            )
            document.submitted_at.GetCurrentTime()
            published = time.perf_counter()
            await js.publish(INGEST_REQUESTED, document.SerializeToString())
            only_this = retrieval_pb2.SearchFilter(document_ids=[document_id])
            while not await retrieval.search(
                "", "store opens late for stocktaking", 1, None, retrieval_pb2.SEARCH_MODE_SPARSE, search_filter=only_this
            ):
                if time.perf_counter() - published > 60:
                    raise TimeoutError(f"{document_id} not searchable within 60 s")
                await asyncio.sleep(0.01)
            latencies.append(time.perf_counter() - published)
            await asyncio.sleep(0.05)  # the stage events are already out; let their callbacks run
            stages = {stage: (seen[(document_id, stage)] - published) * 1000
                      for _, _, stage in STAGES if (document_id, stage) in seen}
            for stage, elapsed_ms in stages.items():
                stage_ms[stage].append(elapsed_ms)
            print(f"  live document {number}: searchable after {latencies[-1] * 1000:.0f} ms "
                  f"({', '.join(f'{stage} {ms:.0f}' for stage, ms in stages.items())})", flush=True)
            await asyncio.sleep(1.0)
        await bulk_done
        elapsed = time.perf_counter() - started
        load_window = load.close()
        cpu_after = stack.cpu_seconds()
        await asyncio.sleep(0.5)  # the last handlers record their durations after publishing
        profile = stage_profile(metrics_before, stack.metric_totals(), bulk_count)
    finally:
        await channel.close()
        await connection.close()
    return {
        "bulk_documents": bulk_count,
        "document_bytes": TARGET_BYTES,
        "bulk_seconds": elapsed,
        "documents_per_s": bulk_count / elapsed,
        "live_documents": len(latencies),
        "live_p50_ms": float(np.percentile(latencies, 50) * 1000) if latencies else None,
        "live_p95_ms": float(np.percentile(latencies, 95) * 1000) if latencies else None,
        "live_max_ms": float(max(latencies) * 1000) if latencies else None,
        # Publish → each stage's event, p50 and p95, to show where a slow live update waited.
        "live_stage_ms": {stage: {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}
                          for stage, values in stage_ms.items() if values},
        **load_window,
        # CPU seconds per process during the bulk load, and per bulk document: on two cores, where the cores went.
        "cpu_seconds": {name: cpu_after[name] - cpu_before[name] for name in cpu_after},
        "cpu_ms_per_document": {name: (cpu_after[name] - cpu_before[name]) * 1000 / bulk_count for name in cpu_after},
        "cores_busy": sum(cpu_after[name] - cpu_before[name] for name in cpu_after) / elapsed,
        "stage_profile": profile,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=200, help="bulk documents (default: a quick run)")
    parser.add_argument("--full", action="store_true", help="the issue's size: 1,000 bulk documents")
    parser.add_argument("--live", type=int, default=20, help="interactive documents published during the bulk load")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--models-home", type=Path, default=REPO / ".llmos")
    parser.add_argument("--set", action="append", default=[], metavar="LLMOS_NAME=VALUE",
                        help="a setting for the services, e.g. LLMOS_INFERENCE_EMBED_MAX_BATCH=16 (repeatable)")
    args = parser.parse_args(argv)
    count = 1000 if args.full else args.documents
    overrides = dict(item.split("=", 1) for item in args.set)
    with tempfile.TemporaryDirectory(prefix="llmos-bench-ingest-") as folder:
        stack = PrivateStack(Path(folder), args.models_home, overrides)
        try:
            result = asyncio.run(measure(stack, count, args.live, args.timeout))
            result["peak_rss_mb"] = stack.peak_rss_mb()
        finally:
            stack.stop()
    print(f"\n{'bulk documents':<34}{result['bulk_documents']:>10}")
    print(f"{'end to end (publish → indexed)':<34}{result['documents_per_s']:>10.1f} documents/s")
    if result["live_documents"]:
        print(f"{'interactive publish → searchable':<34}{result['live_p50_ms']:>10.0f} ms p50   {result['live_p95_ms']:.0f} ms p95 "
              f"(target p95 <= 1000 ms; {result['live_documents']} documents)")
    for stage, figures in result["live_stage_ms"].items():  # type: ignore[union-attr]
        print(f"{'  publish → ' + stage:<34}{figures['p50']:>10.0f} ms p50   {figures['p95']:.0f} ms p95")
    print(f"load average {result['load_average_1m_before']:.1f} → {result['load_average_1m_after']:.1f}, other processes "
          f"{result['other_processes_cores']:.2f} cores{' (noisy)' if result['noisy'] else ''}; services {result['cores_busy']:.2f} cores")
    print(f"\n{'CPU per bulk document':<34}" + "   ".join(f"{name} {ms:.0f} ms" for name, ms in result["cpu_ms_per_document"].items()))  # type: ignore[union-attr]
    print(f"\n{'stage':<16}{'service':<11}{'what':<62}{'calls':>7}{'seconds':>9}{'ms/doc':>8}")
    for row in result["stage_profile"]:  # type: ignore[union-attr]
        print(f"{row['stage']:<16}{row['service']:<11}{row['what']:<62}{row['calls']:>7}{row['seconds']:>9.2f}{row['ms_per_document']:>8.1f}")
    for name, peak in result["peak_rss_mb"].items():  # type: ignore[union-attr]
        print(f"{'peak RSS ' + name:<34}{peak:>10.0f} MB")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "ingest", "settings": overrides, **result}, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
