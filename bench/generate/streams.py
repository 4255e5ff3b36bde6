"""Generation through the gRPC service at several concurrent stream counts, on a chosen device:
`python -m bench.generate.streams --device cuda --streams 1,8,32,64` (bench/gpu.sh runs it).

Each count sends that many chats at once, every one new (numbered by count and round, so none
shares a cached prefix with an earlier prompt), and records the aggregate tokens/s, each
stream's decode tokens/s and its time to first token. The service decodes as many sequences
together as the largest count. No reference engine: this measures how the platform's own
throughput scales with streams on the device (the CPU comparison with llama.cpp is
`python -m bench.generate`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import LoadWindow
from bench.generate.__main__ import CONCURRENT_QUESTIONS, chat, stream
from bench.inference.service import METADATA, REPO, inference_service, print_table
from llmos.clients import InferenceClient
from services.inference.settings import InferenceDevice

MODEL = "smollm2-135m-instruct"


def stream_counts(text: str) -> list[int]:
    """`1,8,32,64` -> [1, 8, 32, 64]; each at least 1."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of stream counts") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more stream counts, each at least 1")
    return counts


def service_settings(device: str, counts: list[int], threads: int, memory_mb: int) -> dict[str, str]:
    """The service's settings for the sweep: every count's streams decode together."""
    widest = max(counts)
    return {
        "LLMOS_INFERENCE_DEVICE": device,
        "LLMOS_INFERENCE_THREADS": str(threads),
        "LLMOS_INFERENCE_MAX_BATCH": str(widest),
        "LLMOS_INFERENCE_QUEUE_SIZE": str(max(64, 2 * widest)),
        "LLMOS_INFERENCE_GENERATION_MEMORY_MB": str(memory_mb),
    }


def figures(results: list[Any], elapsed_s: float) -> dict[str, float]:
    ttfts = [r.ttft_s * 1000 for r in results]
    rates = [r.decode_rate for r in results if r.tokens > 1]
    return {
        "streams": len(results),
        "aggregate_tokens_per_s": sum(r.tokens for r in results) / elapsed_s,
        "stream_decode_tokens_per_s_median": float(np.median(rates)) if rates else 0.0,
        "ttft_ms_p50": float(np.percentile(ttfts, 50)),
        "ttft_ms_p95": float(np.percentile(ttfts, 95)),
        "tokens": sum(r.tokens for r in results),
        "seconds": elapsed_s,
    }


async def sweep(addr: str, counts: list[int], max_new: int, rounds: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(addr) as channel:
        inference = InferenceClient(channel, METADATA)
        await stream(inference, chat(None, "Hello"), 4)  # warm-up: first-call allocations
        served = {model.name: model for model in await inference.models(timeout_s=60)}
        per_count: dict[str, Any] = {}
        for count in counts:
            best: dict[str, float] | None = None
            for number in range(rounds):
                questions = [f"({count}.{number}.{i}) {CONCURRENT_QUESTIONS[i % len(CONCURRENT_QUESTIONS)]}"
                             for i in range(count)]
                started = time.perf_counter()
                results = await asyncio.gather(*(stream(inference, chat(None, q), max_new) for q in questions))
                measured = figures(list(results), time.perf_counter() - started)
                if best is None or measured["aggregate_tokens_per_s"] > best["aggregate_tokens_per_s"]:
                    best = measured
            per_count[str(count)] = best
            print(f"  {count} streams: {best['aggregate_tokens_per_s']:.0f} tokens/s, "
                  f"TTFT p50 {best['ttft_ms_p50']:.0f} ms", flush=True)
    model = served[MODEL]
    return {
        "model": {"name": model.name, "variant": model.variant, "execution_provider": model.execution_provider},
        "streams": per_count,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generate.streams", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=[device.value for device in InferenceDevice], default="cpu")
    parser.add_argument("--streams", type=stream_counts, default=[1, 8, 32, 64], help="comma-separated, e.g. 1,8,32,64")
    parser.add_argument("--max-new", type=int, default=64, help="tokens each stream generates")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each count; the fastest counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--memory-mb", type=int, default=16384, help="LLMOS_INFERENCE_GENERATION_MEMORY_MB: room for the wide KV cache")
    parser.add_argument("--home", type=Path, default=REPO / ".llmos")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/generate-streams-DEVICE.json)")
    args = parser.parse_args(argv)

    window = LoadWindow()
    with inference_service(args.home, service_settings(args.device, args.streams, args.threads, args.memory_mb)) as addr:
        measured = asyncio.run(sweep(addr, args.streams, args.max_new, args.rounds))
    load = window.close()
    rows = [(count, f"{f['aggregate_tokens_per_s']:.1f}", f"{f['stream_decode_tokens_per_s_median']:.1f}",
             f"{f['ttft_ms_p50']:.0f}", f"{f['ttft_ms_p95']:.0f}") for count, f in measured["streams"].items()]
    model = measured["model"]
    print_table(f"Generation through gRPC on {args.device} ({model['variant']}, {model['execution_provider']}), "
                f"greedy, max_new_tokens={args.max_new}",
                ("streams", "aggregate tokens/s", "per-stream decode tokens/s", "TTFT p50 ms", "TTFT p95 ms"), rows)
    out = args.out or REPO / "bench" / "results" / f"generate-streams-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "max_new_tokens": args.max_new, "rounds": args.rounds,
                               "load": load, **measured}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
