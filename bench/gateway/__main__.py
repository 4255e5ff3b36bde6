"""Gateway overhead: the same chat turn, generation and embedding call over HTTP (the gateway's
OpenAI-compatible API) and over gRPC (the typed clients), interleaved in one run.

Each round runs every kind of call once over each transport, alternating which goes first, so a
warm cache or a burst of load from elsewhere falls on both alike. Per kind and transport: the
p50, p95 and spread (quartiles, min, max) of the total time, the time to first token for streamed
calls and the gaps between tokens; and per round the difference HTTP minus gRPC, reported as the
median and quartiles of those pairs (the difference of two p50s would mix unrelated calls).

- chat turn: DialogueService.Chat vs POST /v1/chat/completions with model `llmos-assistant`, streamed
- generation: InferenceService.Generate vs POST /v1/chat/completions with the generation model,
  streamed, 48 tokens, greedy: inter-token gaps show whether SSE delivers tokens as they come
- embedding: InferenceService.Embed vs POST /v1/embeddings, one sentence

Both clients keep one connection open (HTTP keep-alive, one gRPC channel), as a real client would.
It starts a private embedded stack (free ports, a temporary home sharing the built models),
indexes `demo/kb`, prints the table and writes bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from bench.common import REPO, private_environment
from llmos.clients import DialogueClient, InferenceClient, IngestClient, chat_messages
from llmos.grpcutil.client import open_channel
from llmos.settings import PlatformSettings, load_settings
from llmos.stack import Stack
from llmos.v1 import common_pb2, dialogue_pb2, inference_pb2, ingest_pb2

RESULTS = REPO / "bench" / "results" / "gateway.json"
BENCH_KEY = "bench-admin-key"
GENERATION_TOKENS = 48


def questions() -> list[str]:
    data = yaml.safe_load((REPO / "demo" / "questions.yaml").read_text(encoding="utf-8"))
    return [item["question"] for item in data["in_domain"]]


class Timing:
    """One streamed call as its reader sees it: first token, every gap between tokens, total."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.arrivals: list[float] = []

    def token(self) -> None:
        self.arrivals.append(time.perf_counter())

    def result(self) -> dict[str, Any]:
        total = (time.perf_counter() - self.started) * 1000
        first = (self.arrivals[0] - self.started) * 1000 if self.arrivals else total
        gaps = [(b - a) * 1000 for a, b in zip(self.arrivals, self.arrivals[1:])]
        return {"total_ms": total, "first_token_ms": first, "gaps_ms": gaps, "tokens": len(self.arrivals)}


async def sse_data(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


class Runs:
    def __init__(
        self, http: httpx.AsyncClient, dialogue: DialogueClient, inference: InferenceClient, generation_model: str, embedding_model: str
    ) -> None:
        self.http = http
        self.dialogue = dialogue
        self.inference = inference
        self.model = generation_model
        self.embedding_model = embedding_model

    async def chat_http(self, question: str) -> dict[str, Any]:
        return await self._completions_http({"model": "llmos-assistant", "messages": [{"role": "user", "content": question}]})

    async def chat_grpc(self, question: str) -> dict[str, Any]:
        timing = Timing()
        async for response in self.dialogue.chat(dialogue_pb2.ChatRequest(message=question), 300):
            if response.delta:
                timing.token()
        return timing.result()

    async def generate_http(self, question: str) -> dict[str, Any]:
        return await self._completions_http({
            "model": self.model, "messages": [{"role": "user", "content": question}],
            "max_tokens": GENERATION_TOKENS, "temperature": 0,
        })

    async def _completions_http(self, body: dict[str, Any]) -> dict[str, Any]:
        """One streamed POST /v1/chat/completions, timed at each chunk that carries content."""
        timing = Timing()
        async with self.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            response.raise_for_status()
            async for chunk in sse_data(response):
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    timing.token()
        return timing.result()

    async def generate_grpc(self, question: str) -> dict[str, Any]:
        timing = Timing()
        request = inference_pb2.GenerateRequest(
            model=self.model, messages=chat_messages([("user", question)]),
            sampling=inference_pb2.SamplingParams(max_new_tokens=GENERATION_TOKENS), priority=common_pb2.PRIORITY_INTERACTIVE,
        )
        async for response in self.inference.generate(request, timeout_s=300):
            if response.delta:
                timing.token()
        return timing.result()

    async def embed_http(self, question: str) -> dict[str, Any]:
        started = time.perf_counter()
        response = await self.http.post("/v1/embeddings", json={"model": self.embedding_model, "input": question, "encoding_format": "float"})
        response.raise_for_status()
        return {"total_ms": (time.perf_counter() - started) * 1000}

    async def embed_grpc(self, question: str) -> dict[str, Any]:
        started = time.perf_counter()
        await self.inference.embed_response([question], timeout_s=60)
        return {"total_ms": (time.perf_counter() - started) * 1000}


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    return {"p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)), "q1": float(np.percentile(array, 25)),
            "q3": float(np.percentile(array, 75)), "min": float(array.min()), "max": float(array.max()), "n": len(values)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {"total_ms": spread([row["total_ms"] for row in rows])}
    if "first_token_ms" in rows[0]:
        summary["first_token_ms"] = spread([row["first_token_ms"] for row in rows])
        summary["gap_ms"] = spread([gap for row in rows for gap in row["gaps_ms"]])
    return summary


def paired(http: list[dict[str, Any]], grpc: list[dict[str, Any]], field: str) -> dict[str, float]:
    extra = [h[field] - g[field] for h, g in zip(http, grpc, strict=True)]
    share = [(h[field] - g[field]) / g[field] for h, g in zip(http, grpc, strict=True) if g[field] > 0]
    return {"extra_ms_p50": float(np.median(extra)), "extra_ms_q1": float(np.percentile(extra, 25)),
            "extra_ms_q3": float(np.percentile(extra, 75)), "share_p50": float(np.median(share))}


async def index_kb(ingest: IngestClient) -> None:
    articles = sorted((REPO / "demo" / "kb").glob("*.md"))
    for article in articles:
        await ingest.submit(ingest_pb2.SubmitDocumentRequest(
            document_id=article.stem, title=article.read_text().splitlines()[0].lstrip("# "), mime_type="text/markdown",
            content=article.read_bytes()))
    statuses = await ingest.wait_until_settled([article.stem for article in articles], within_s=300, poll_s=0.2)
    pending = [name for name, status in statuses.items() if status.stage != common_pb2.DOCUMENT_STAGE_INDEXED]
    if pending:
        raise SystemExit(f"not indexed after 300 s: {sorted(pending)}")


async def run(settings: PlatformSettings, rounds: int) -> dict[str, Any]:
    channels = {name: open_channel(settings.service_addr(name), BENCH_KEY) for name in ("dialogue", "inference", "ingest")}
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    async with httpx.AsyncClient(base_url=f"http://{settings.gateway_addr}", headers=headers, timeout=300) as http:
        try:
            await index_kb(IngestClient(channels["ingest"]))
            models = await InferenceClient(channels["inference"]).models(timeout_s=30)
            runs = Runs(http, DialogueClient(channels["dialogue"]), InferenceClient(channels["inference"]),
                        next(m.name for m in models if m.role == inference_pb2.MODEL_ROLE_GENERATION),
                        next(m.name for m in models if m.role == inference_pb2.MODEL_ROLE_EMBEDDING))
            kinds: dict[str, tuple[Callable[[str], Awaitable[dict[str, Any]]], Callable[[str], Awaitable[dict[str, Any]]]]] = {
                "chat turn": (runs.chat_http, runs.chat_grpc),
                "generation": (runs.generate_http, runs.generate_grpc),
                "embedding": (runs.embed_http, runs.embed_grpc),
            }
            asked = questions()
            # Warm-up, not measured: the first call of each kind loads caches and connections.
            for over_http, over_grpc in kinds.values():
                await over_http(asked[0])
                await over_grpc(asked[0])
            rows: dict[str, dict[str, list[dict[str, Any]]]] = {kind: {"http": [], "grpc": []} for kind in kinds}
            for index in range(rounds):
                question = asked[index % len(asked)]
                for kind, (over_http, over_grpc) in kinds.items():
                    order = [("http", over_http), ("grpc", over_grpc)]
                    for transport, call in order if index % 2 == 0 else reversed(order):
                        rows[kind][transport].append(await call(question))
                print(f"round {index + 1}/{rounds}", end="\r", flush=True)
            return rows
        finally:
            for channel in channels.values():
                await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmos-bench-gateway-") as folder:
        private_environment(Path(folder), BENCH_KEY, LLMOS_DEV="true")
        settings = load_settings(PlatformSettings)
        stack = Stack(settings)
        load_before = os.getloadavg()
        print(f"starting a private stack with the gateway in {folder} …")
        print(f"SERVING after {stack.start():.1f} s")
        try:
            rows = asyncio.run(run(settings, args.rounds))
        finally:
            load_after = os.getloadavg()
            stack.stop()
    results: dict[str, Any] = {"rounds": args.rounds, "generation_tokens": GENERATION_TOKENS, "kinds": {},
                               "load_average_1m": {"before": load_before[0], "after": load_after[0]}, "cpus": os.cpu_count()}
    print(f"\n{'call':<11} {'over':<5} {'total p50':>10} {'p95':>8} {'[q1, q3]':>18} {'TTFT p50':>9} {'gap p50':>8} {'gap p95':>8}  (ms)")
    for kind, by_transport in rows.items():
        entry: dict[str, Any] = {transport: summarize(values) for transport, values in by_transport.items()}
        entry["paired_total"] = paired(by_transport["http"], by_transport["grpc"], "total_ms")
        if "first_token_ms" in by_transport["http"][0]:
            entry["paired_first_token"] = paired(by_transport["http"], by_transport["grpc"], "first_token_ms")
            entry["gap_p50_ratio"] = entry["http"]["gap_ms"]["p50"] / entry["grpc"]["gap_ms"]["p50"]
        results["kinds"][kind] = entry
        for transport in ("http", "grpc"):
            summary = entry[transport]
            total = summary["total_ms"]
            first = summary.get("first_token_ms", {}).get("p50", float("nan"))
            gap = summary.get("gap_ms", {})
            print(f"{kind:<11} {transport:<5} {total['p50']:>10.1f} {total['p95']:>8.1f} [{total['q1']:>7.1f}, {total['q3']:>7.1f}]"
                  f" {first:>9.1f} {gap.get('p50', float('nan')):>8.2f} {gap.get('p95', float('nan')):>8.2f}")
    print("\nper round, HTTP minus gRPC (median [quartiles])")
    for kind, entry in results["kinds"].items():
        total = entry["paired_total"]
        line = f"{kind:<11} total {total['extra_ms_p50']:+7.2f} ms [{total['extra_ms_q1']:+.2f}, {total['extra_ms_q3']:+.2f}] = {total['share_p50']:+.1%}"
        if "paired_first_token" in entry:
            line += f"; first token {entry['paired_first_token']['extra_ms_p50']:+.2f} ms; gap p50 ratio {entry['gap_p50_ratio']:.3f}"
        print(line)
    print(f"targets: chat turn overhead <= 5% at p50, added first-token time <= 10 ms, gaps within 10% of gRPC; "
          f"1-min load {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
