"""Chat turn latency per stage: N questions through DialogueService.Chat over gRPC, against the same
turns run inside this process with no network hop at all.

Both runs answer the same questions on the same demo knowledge base with the same classifier. The
in-process reference (bench.chat.inprocess) is the dialogue core calling the inference core (built
by the inference service's own factory, same settings) and a retrieval core whose index holds the
very chunks and vectors the platform indexed (read back from the stack's stream); token counting
with the same tokenizer. It drops everything the platform adds around those cores: the gRPC hops
(client to dialogue, dialogue to inference, retrieval and tokenizer) with authentication and
tracing, sessions in the KV bucket and events on the bus (kept in memory, not published). The
difference between the two is the platform's overhead over the whole path.

The overhead is taken per question, from the pair of runs of that question (gRPC minus in-process,
as a share of the gRPC turn), and reported as the median and quartiles of those pairs: the
difference of two p50s would mix unrelated turns. Turns the model answers (seconds of generation)
and turns without a model call (scripted replies, out-of-scope hand-offs: milliseconds) are
reported apart, since the same few milliseconds are a very different share of each. The machine's
load average before and after is recorded: on a busy machine the figures are noisy.

It starts a private embedded stack (free ports, temporary home sharing the built models), indexes
`demo/kb`, runs both, prints the table and writes bench/results/chat.json.

Load (`--load 16,16,64`): on a second private stack with the settings `llmos up` runs with (prompt
prefix cache on), N turns fired together, each a different question with a client deadline of
`--turn-deadline-s`; per round: turns/s (turns answered / the wall time until the last ended),
first-token p50/p95 of the answered turns and the p50/p95 of the service's own stages (intent,
retrieval, evidence), refusals (RESOURCE_EXHAUSTED: admission expected a wait past the deadline
or the longest wait) with the time from the call to the refusal and the retry hint, and other
failures. The first round meets a dialogue that has embedded no source sentence yet (after one
warm-up turn); a round of a size already run is recorded as `16#2`: the same load once the
articles' sentences are known. `--drafts` lets the model draft answers (LLMOS_DIALOGUE_DRAFTS):
without it a turn quotes the evidence and makes no generation call, as `llmos up` does by default.
`--questions 0` runs the load alone; the load figures go beside the others in chat.json (under
`load`, or `load_with_drafts`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import yaml

from bench.chat.inprocess import CoreEmbedder, CoreGenerator, CoreRetriever, inference_core, replay_indexed_chunks, retrieval_core
from bench.common import REPO, LoadWindow, private_environment
from llmos.audit import AuditLog
from llmos.auth import Principal
from llmos.clients import DialogueClient, IngestClient, Metadata, RetrievalClient
from llmos.crypto import AtRest
from llmos.errors import LlmosError, ResourceExhausted
from llmos.grpcutil.client import bearer, open_channel
from llmos.intents import ensure_intent_classifier
from llmos.models import artefact_dir
from llmos.settings import load_settings
from llmos.stack import Stack
from llmos.testing import MemoryBucket, MemoryPublisher
from llmos.tokenization import ModelTokenizer
from llmos.v1 import common_pb2, dialogue_pb2, ingest_pb2
from services.dialogue.app import limits_of
from services.dialogue.backends import Backends, Generator, GrpcRetriever, LocalTokenCounter
from services.dialogue.core import DialogueCore
from services.dialogue.replies import load_assistant
from services.dialogue.sessions import SessionStore
from services.dialogue.settings import DialogueSettings
from services.dialogue.slots import OrderBook

RESULTS = REPO / "bench" / "results" / "chat.json"
BENCH_KEY = "bench-admin-key"
STAGES = ("intent_ms", "retrieval_ms", "evidence_ms", "verify_ms", "first_token_ms", "total_ms")


def questions(count: int) -> list[str]:
    """The answers-eval questions, then the same questions reworded, up to `count` (no two alike)."""
    data = yaml.safe_load((REPO / "demo" / "questions.yaml").read_text(encoding="utf-8"))
    base = [item["question"] for item in data["in_domain"]] + list(data["out_of_domain"])
    asked = base + [f"Could you tell me: {question[0].lower()}{question[1:]}" for question in base]
    if count > len(asked):
        raise SystemExit(f"at most {len(asked)} questions")
    return asked[:count]


async def index_kb(settings: DialogueSettings, metadata: Metadata) -> None:
    articles = sorted((REPO / "demo" / "kb").glob("*.md"))
    async with grpc.aio.insecure_channel(settings.ingest_addr) as channel:
        ingest = IngestClient(channel, metadata)
        for article in articles:
            await ingest.submit(
                ingest_pb2.SubmitDocumentRequest(
                    document_id=article.stem, title=article.read_text().splitlines()[0].lstrip("# "),
                    mime_type="text/markdown", content=article.read_bytes(),
                ),
            )
        statuses = await ingest.wait_until_settled([article.stem for article in articles], within_s=300, poll_s=0.2)
        pending = [name for name, status in statuses.items() if status.stage != common_pb2.DOCUMENT_STAGE_INDEXED]
        if pending:
            raise SystemExit(f"not indexed after 300 s: {sorted(pending)}")


async def timed_turn(responses: AsyncIterator[dialogue_pb2.ChatResponse]) -> dict[str, float]:
    """Reads one turn's responses, started by the caller just before: first token and total as the reader
    sees them; the service's own intent, retrieval, evidence and verifier stages from the last message."""
    started = time.perf_counter()
    first = 0.0
    latency = dialogue_pb2.TurnLatency()
    async for response in responses:
        if response.delta and not first:
            first = (time.perf_counter() - started) * 1000
        if response.final:
            latency = response.latency
    total = (time.perf_counter() - started) * 1000
    return {
        "intent_ms": latency.intent_ms, "retrieval_ms": latency.retrieval_ms, "evidence_ms": latency.evidence_ms,
        "verify_ms": latency.verify_ms, "first_token_ms": first, "total_ms": total,
    }


async def grpc_turn(dialogue: DialogueClient, question: str) -> dict[str, float]:
    return await timed_turn(dialogue.chat(dialogue_pb2.ChatRequest(message=question), 300))


async def local_turn(core: DialogueCore, principal: Principal, question: str) -> dict[str, float]:
    return await timed_turn(core.chat(principal, principal.tenant, dialogue_pb2.ChatRequest(message=question), None))


class CountingGenerator:
    """Counts generation calls, to tell the turns the model answered from the others."""

    def __init__(self, inner: Generator) -> None:
        self._inner = inner
        self.calls = 0

    def stream(self, messages: Sequence[tuple[str, str]], max_new_tokens: int, timeout_s: float) -> AsyncIterator[str]:
        self.calls += 1
        return self._inner.stream(messages, max_new_tokens, timeout_s)


async def run_both(settings: DialogueSettings, metadata: Metadata, asked: list[str]) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Each question once over gRPC and once in process, alternating which goes first, so neither
    run systematically meets the other's warm caches (e.g. the inference service's prompt prefixes)."""
    principal = Principal("bench", "bench", frozenset({"admin"}))
    inference, close_inference = await inference_core()
    embedder = CoreEmbedder(inference)
    retrieval = retrieval_core(embedder)
    indexed = await replay_indexed_chunks(settings, retrieval)
    print(f"in-process reference: inference core loaded, {indexed} documents indexed in its own retrieval core")
    classifier = await ensure_intent_classifier(
        settings.home, settings.dialogue_intents_file, embedder.embed, settings.dialogue_intent_target_accuracy
    )
    tokens = LocalTokenCounter(ModelTokenizer.from_dir(artefact_dir(settings.home, "smollm2-135m-instruct")))
    bus = MemoryPublisher()
    generator = CountingGenerator(CoreGenerator(inference, principal.tenant))
    core = DialogueCore(
        bus,
        SessionStore(MemoryBucket(), settings.dialogue_session_idle_ttl_s, AtRest(None, "bench sessions")),
        AuditLog(bus, "dialogue-bench"),
        classifier,
        Backends(embedder, CoreRetriever(retrieval), generator, tokens),
        OrderBook.from_file(settings.dialogue_orders_file),
        limits_of(settings),
        load_assistant(settings.dialogue_assistant_file),
    )
    grpc_rows, local_rows = [], []
    async with grpc.aio.insecure_channel(settings.dialogue_addr) as channel:
        dialogue = DialogueClient(channel, metadata)
        # One warm-up turn each, worded unlike the measured ones, so start-up is not measured.
        await grpc_turn(dialogue, "Hello, what are your store opening hours?")
        await local_turn(core, principal, "Hi, when are your stores open?")
        for index, question in enumerate(asked):
            calls = generator.calls
            if index % 2:
                grpc_rows.append(await grpc_turn(dialogue, question))
                local_rows.append(await local_turn(core, principal, question))
            else:
                local_rows.append(await local_turn(core, principal, question))
                grpc_rows.append(await grpc_turn(dialogue, question))
            # Same classifier, same passages: the gRPC turn took the same path as the in-process one.
            grpc_rows[-1]["model"] = local_rows[-1]["model"] = float(generator.calls > calls)
    # The reference's index against the service's: the same passages for every question.
    remote = open_channel(settings.retrieval_addr, BENCH_KEY)
    for question, row in zip(asked, local_rows, strict=True):
        vector = (await embedder.embed([question]))[0].tolist()
        ours = await CoreRetriever(retrieval).search(principal.tenant, question, 5, 60, vector)
        served = await GrpcRetriever(RetrievalClient(remote)).search(principal.tenant, question, 5, 60, vector)
        row["same_passages"] = float([p.chunk_id for p in ours] == [p.chunk_id for p in served])
    await remote.close()
    retrieval.close()
    await close_inference()
    return grpc_rows, local_rows


def paired_overhead(grpc_rows: list[dict[str, float]], local_rows: list[dict[str, float]]) -> dict[str, float]:
    """Per question: gRPC turn minus in-process turn (ms) and that as a share of the gRPC turn."""
    if not grpc_rows:
        return {"turns": 0}
    extra = np.array([g["total_ms"] - local["total_ms"] for g, local in zip(grpc_rows, local_rows, strict=True)])
    share = extra / np.array([g["total_ms"] for g in grpc_rows])
    quartiles = lambda values: [float(q) for q in np.percentile(values, [25, 50, 75])]  # noqa: E731
    (ms_q1, ms_p50, ms_q3), (share_q1, share_p50, share_q3) = quartiles(extra), quartiles(share)
    return {
        "turns": len(grpc_rows), "extra_ms_p50": ms_p50, "extra_ms_q1": ms_q1, "extra_ms_q3": ms_q3,
        "share_p50": share_p50, "share_q1": share_q1, "share_q3": share_q3,
    }


async def load_turn(dialogue: DialogueClient, question: str, deadline_s: float) -> dict[str, float | str]:
    """One turn of a load round: its first token and total, or how and how fast it was refused."""
    started = time.perf_counter()
    try:
        row: dict[str, float | str] = {"outcome": "answered", **await timed_turn(dialogue.chat(dialogue_pb2.ChatRequest(message=question), deadline_s))}
    except ResourceExhausted as refused:
        row = {"outcome": "refused", "retry_after_s": refused.retry_after_s}
    except LlmosError as failed:
        row = {"outcome": type(failed).__name__}
    row["ended_ms"] = (time.perf_counter() - started) * 1000
    return row


async def load_round(dialogue: DialogueClient, asked: list[str], deadline_s: float) -> dict[str, object]:
    """`asked` fired together; what the callers saw."""
    started = time.perf_counter()
    rows = await asyncio.gather(*(load_turn(dialogue, question, deadline_s) for question in asked))
    wall_s = time.perf_counter() - started
    answered = [row for row in rows if row["outcome"] == "answered"]
    refused = [row for row in rows if row["outcome"] == "refused"]
    percentiles = lambda values, q: float(np.percentile(values, q)) if values else None  # noqa: E731
    first = [float(row["first_token_ms"]) for row in answered]
    refusal_ms = [float(row["ended_ms"]) for row in refused]
    stages = {stage: {"p50": percentiles([float(row[stage]) for row in answered], 50),
                      "p95": percentiles([float(row[stage]) for row in answered], 95)}
              for stage in ("intent_ms", "retrieval_ms", "evidence_ms")}
    return {
        "turns": len(asked), "answered": len(answered), "refused": len(refused),
        "failed": {kind: sum(1 for row in rows if row["outcome"] == kind)
                   for kind in sorted({str(row["outcome"]) for row in rows} - {"answered", "refused"})},
        "wall_s": wall_s, "turns_per_s": len(answered) / wall_s,
        "first_token_ms": {"p50": percentiles(first, 50), "p95": percentiles(first, 95)},
        "total_ms": {"p50": percentiles([float(row["total_ms"]) for row in answered], 50),
                     "p95": percentiles([float(row["total_ms"]) for row in answered], 95)},
        "refusal_ms": {"p50": percentiles(refusal_ms, 50), "max": max(refusal_ms, default=None)},
        "retry_after_s_p50": percentiles([float(row["retry_after_s"]) for row in refused], 50),
        "stages_ms": stages,
    }


def load_questions(sizes: Sequence[int]) -> list[list[str]]:
    """For each round, questions the knowledge base answers, reworded unlike the paired run's and
    none asked twice (the dialogue caches a question's search results)."""
    data = yaml.safe_load((REPO / "demo" / "questions.yaml").read_text(encoding="utf-8"))
    pool = [f"Please tell me: {item['question'][0].lower()}{item['question'][1:]}" for item in data["in_domain"]]
    if sum(sizes) > len(pool):
        raise SystemExit(f"at most {len(pool)} load turns in all")
    rounds, start = [], 0
    for size in sizes:
        rounds.append(pool[start:start + size])
        start += size
    return rounds


def run_load(sizes: Sequence[int], deadline_s: float, drafts: bool) -> dict[str, object]:
    """Each round of turns fired together on a private stack with `llmos up`'s settings."""
    rounds = load_questions(sizes)
    with tempfile.TemporaryDirectory(prefix="llmos-bench-chat-load-") as folder:
        private_environment(Path(folder), BENCH_KEY)
        # As `llmos up` runs: the shared system prompt's KV cache reused, the usual call limit.
        for name in ("LLMOS_INFERENCE_PREFIX_CACHE_MIN_TOKENS", "LLMOS_DIALOGUE_CALL_TIMEOUT_S"):
            os.environ.pop(name, None)
        os.environ["LLMOS_DIALOGUE_DRAFTS"] = "true" if drafts else "false"
        settings = load_settings(DialogueSettings)
        stack = Stack(settings)
        print(f"starting a private stack for the load in {folder} …")
        print(f"SERVING after {stack.start():.1f} s")
        try:
            metadata = (("authorization", bearer(BENCH_KEY)),)
            asyncio.run(index_kb(settings, metadata))

            async def rounds_in_turn() -> dict[str, object]:
                async with grpc.aio.insecure_channel(settings.dialogue_addr) as channel:
                    dialogue = DialogueClient(channel, metadata)
                    await grpc_turn(dialogue, "Hello, what are your store opening hours?")  # warm-up
                    results: dict[str, object] = {}
                    for asked in rounds:
                        load = os.getloadavg()[0]
                        name = str(len(asked))
                        while name in results:  # the same size again: `16#2`
                            name = f"{len(asked)}#{int(name.partition('#')[2] or 1) + 1}"
                        results[name] = {**await load_round(dialogue, asked, deadline_s), "load_average_1m_before": load}
                        await asyncio.sleep(2.0)  # the next round starts on an empty queue
                    return results

            by_size = asyncio.run(rounds_in_turn())
        finally:
            stack.stop()
    return {"drafts": drafts, "turn_deadline_s": deadline_s, "cpus": os.cpu_count(), "concurrent": by_size}


def print_load(load: dict[str, object]) -> None:
    print(f"\nturns fired together (drafts {'on' if load['drafts'] else 'off'}, client deadline {load['turn_deadline_s']} s)")
    print(f"{'N':>5} {'answered':>8} {'refused':>7} {'failed':>6} {'turns/s':>8} {'1st tok p50':>11} {'p95 ms':>8}"
          f" {'evidence p50':>12} {'p95':>6} {'refusal ms p50':>14} {'max':>6} {'load':>5}")
    for size, row in load["concurrent"].items():  # type: ignore[attr-defined]
        fmt = lambda value: "-" if value is None else f"{value:.0f}"  # noqa: E731
        print(f"{size:>5} {row['answered']:>8} {row['refused']:>7} {sum(row['failed'].values()):>6} {row['turns_per_s']:>8.2f}"
              f" {fmt(row['first_token_ms']['p50']):>11} {fmt(row['first_token_ms']['p95']):>8}"
              f" {fmt(row['stages_ms']['evidence_ms']['p50']):>12} {fmt(row['stages_ms']['evidence_ms']['p95']):>6}"
              f" {fmt(row['refusal_ms']['p50']):>14} {fmt(row['refusal_ms']['max']):>6} {row['load_average_1m_before']:>5.1f}")


def summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        stage: {"p50": float(np.percentile([row[stage] for row in rows], 50)), "p95": float(np.percentile([row[stage] for row in rows], 95))}
        for stage in STAGES
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=50, help="paired turns (0: the load alone)")
    parser.add_argument("--load", default="16,16,64", help="turns fired together, per round (empty: no load)")
    parser.add_argument("--turn-deadline-s", type=float, default=30.0, help="each load turn's client deadline")
    parser.add_argument("--drafts", action="store_true", help="the model drafts answers during the load")
    args = parser.parse_args()
    sizes = [int(size) for size in args.load.split(",") if size.strip()]
    results = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.exists() else {}
    if args.questions:
        results.update(paired(questions(args.questions)))
    if sizes:
        window = LoadWindow()
        load = run_load(sizes, args.turn_deadline_s, args.drafts)
        reading = window.close()
        load["load_average_1m"] = {"before": reading["load_average_1m_before"], "after": reading["load_average_1m_after"]}
        # Above a load of 1 the machine was shared (as issue 15 reads a run): the figures are noisy.
        load["other_processes_cores"], load["noisy"] = reading["other_processes_cores"], reading["noisy"]
        results["load_with_drafts" if args.drafts else "load"] = load
        print_load(load)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")


def paired(asked: list[str]) -> dict[str, object]:
    """The paired gRPC / in-process turns on their own private stack, printed; their figures."""
    with tempfile.TemporaryDirectory(prefix="llmos-bench-chat-") as folder:
        # Latency is measured, not limited: a slow machine must not turn into failed turns.
        private_environment(Path(folder), BENCH_KEY, LLMOS_DIALOGUE_CALL_TIMEOUT_S="600")
        settings = load_settings(DialogueSettings)
        stack = Stack(settings)
        print(f"starting a private stack in {folder} …")
        print(f"SERVING after {stack.start():.1f} s")
        try:
            metadata = (("authorization", bearer(BENCH_KEY)),)
            asyncio.run(index_kb(settings, metadata))
            window = LoadWindow()
            grpc_rows, local_rows = asyncio.run(run_both(settings, metadata, asked))
            load = window.close()
        finally:
            stack.stop()
    groups = {
        "all turns": [True] * len(asked),
        "model-answered turns": [bool(row["model"]) for row in local_rows],
        "turns without a model call": [not row["model"] for row in local_rows],
    }
    grouped = {
        name: ([g for g, keep in zip(grpc_rows, mask) if keep], [local for local, keep in zip(local_rows, mask) if keep])
        for name, mask in groups.items()
    }
    overhead = {name: paired_overhead(*rows) for name, rows in grouped.items()}
    stages = {name: {"grpc": summary(g), "in_process": summary(local)} for name, (g, local) in grouped.items() if g}
    results = {
        "questions": len(asked), "stages": stages, "paired_overhead": overhead,
        "load_average_1m": {"before": load["load_average_1m_before"], "after": load["load_average_1m_after"]},
        "other_processes_cores": load["other_processes_cores"], "noisy": load["noisy"], "cpus": os.cpu_count(),
        "reference": "the same turns with no network hop: dialogue, inference and retrieval cores in this process",
        "turns": [{"question": q, "grpc": g, "in_process": local} for q, g, local in zip(asked, grpc_rows, local_rows, strict=True)],
    }
    results["overhead_fraction_p50"] = overhead["all turns"]["share_p50"]
    results["same_passages"] = {"questions": len(local_rows), "same": int(sum(row["same_passages"] for row in local_rows))}
    for name, by_run in stages.items():
        print(f"\nchat turn latency, {name} ({overhead[name]['turns']} of {len(asked)} questions; ms)")
        print(f"{'stage':<16} {'gRPC p50':>9} {'gRPC p95':>9} {'in-proc p50':>12} {'in-proc p95':>12}")
        for stage in STAGES:
            g, local = by_run["grpc"][stage], by_run["in_process"][stage]
            print(f"{stage:<16} {g['p50']:>9.1f} {g['p95']:>9.1f} {local['p50']:>12.1f} {local['p95']:>12.1f}")
    print("\nplatform overhead over the whole path, per question: gRPC turn minus the same turn with no network hop"
          " (dialogue, inference and retrieval cores in process; median [quartiles])")
    print(f"{'turns':<28} {'n':>3} {'extra ms':>24} {'share of the turn':>28}")
    for name, row in overhead.items():
        if row["turns"]:
            print(f"{name:<28} {row['turns']:>3} {row['extra_ms_p50']:>8.1f} [{row['extra_ms_q1']:>6.1f}, {row['extra_ms_q3']:>6.1f}]"
                  f" {row['share_p50']:>11.1%} [{row['share_q1']:>6.1%}, {row['share_q3']:>6.1%}]")
    print(f"the in-process retrieval core found the service's top 5 passages for {results['same_passages']['same']} of"
          f" {len(local_rows)} questions")
    print(f"target: under 10% of turn time; 1-min load average {load['load_average_1m_before']:.1f} before, "
          f"{load['load_average_1m_after']:.1f} after, other processes {load['other_processes_cores']:.2f} cores, on "
          f"{os.cpu_count()} CPUs{'  ** NOISY: load above 1.0 **' if load['noisy'] else ''}")
    return results


if __name__ == "__main__":
    main()
