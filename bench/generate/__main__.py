"""Generation benchmarks through the gRPC service, with llama.cpp (llama-cpp-python, same GGUF,
same threads, same prompt, greedy) as the reference measured in the same run.

1. single stream: decode tokens/s and TTFT;
2. a repeated ~300-token system prefix: TTFT with the prefix cache vs llama.cpp's prompt cache;
3. 8 (and 32) concurrent streams: aggregate tokens/s against the same requests one after another;
4. fairness: tenant A floods batch requests while tenant B sends interactive ones.

The machine's load average is recorded with the figures: on shared cores both engines slow down
(llama.cpp's OpenMP threads most), so compare ratios from one quiet run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from bench.inference.service import METADATA, REPO, inference_service, print_table, write_results
from llmos.clients import InferenceClient
from llmos.models.catalog import get_spec, locate_source
from llmos.models.store import artefact_dir
from llmos.tokenization import ModelTokenizer
from llmos.v1 import common_pb2, inference_pb2

QUESTIONS = [
    "What is the capital of France?", "Write a short poem about the sea.", "How do I return a parcel?",
    "Explain what a battery does.", "Give me three tips for sleeping well.", "What is photosynthesis?",
    "Describe a cat in two sentences.", "Why is the sky blue?",
]
SYSTEM = (
    "You are the customer-service assistant of Northwind, an online shop. Answer only from the help "
    "centre: returns are free within 30 days, refunds take five working days, shipping takes two to four "
    "days in Europe and up to ten days elsewhere, gift cards never expire, and orders can be changed "
    "until they are packed. Be brief, polite and precise; when you do not know, say so and offer a human. "
) * 3


@dataclass
class StreamResult:
    ttft_s: float
    total_s: float
    tokens: int

    @property
    def decode_rate(self) -> float:
        return (self.tokens - 1) / (self.total_s - self.ttft_s) if self.tokens > 1 else 0.0


def chat(system: str | None, question: str) -> list[common_pb2.ChatMessage]:
    messages = [common_pb2.ChatMessage(role="system", content=system)] if system else []
    return [*messages, common_pb2.ChatMessage(role="user", content=question)]


async def stream(inference: InferenceClient, messages: list[common_pb2.ChatMessage], max_new: int,
                 priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_STANDARD, tenant: str = "") -> StreamResult:
    request = inference_pb2.GenerateRequest(
        messages=inference_pb2.ChatMessages(messages=messages), priority=priority, tenant=tenant,
        sampling=inference_pb2.SamplingParams(max_new_tokens=max_new),
    )
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    async for response in inference.generate(request, timeout_s=900):
        if response.token_ids and not first:
            first = time.perf_counter() - started
        tokens += len(response.token_ids)
    return StreamResult(first, time.perf_counter() - started, tokens)


def llama_stream(llm, prompt: str, max_new: int) -> StreamResult:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    for _ in llm.create_completion(prompt, max_tokens=max_new, temperature=0.0, stream=True):
        if not first:
            first = time.perf_counter() - started
        tokens += 1
    return StreamResult(first, time.perf_counter() - started, tokens)


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


async def service_benchmarks(addr: str, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    async with grpc.aio.insecure_channel(addr) as channel:
        inference = InferenceClient(channel, METADATA)
        await stream(inference, chat(None, "Hello"), 4)  # warm-up
        single = [await stream(inference, chat(None, q), args.max_new) for q in QUESTIONS[:3]]
        out["single_decode_tps"] = float(np.median([r.decode_rate for r in single]))
        out["single_ttft_ms"] = float(np.median([r.ttft_s for r in single])) * 1000
        cold = await stream(inference, chat(SYSTEM, QUESTIONS[0]), 2)  # fills the prefix cache
        out["prefix_cold_ttft_ms"] = cold.ttft_s * 1000
        prefixed = [await stream(inference, chat(SYSTEM, q), 2) for q in QUESTIONS[1:4]]
        out["prefix_ttft_ms"] = float(np.median([r.ttft_s for r in prefixed])) * 1000

        for count in (8, args.wide):
            requests = [chat(None, QUESTIONS[i % len(QUESTIONS)]) for i in range(count)]
            started = time.perf_counter()
            sequential = [await stream(inference, m, args.max_new) for m in requests] if count == 8 else []
            sequential_s = time.perf_counter() - started
            started = time.perf_counter()
            together = await asyncio.gather(*(stream(inference, m, args.max_new) for m in requests))
            together_s = time.perf_counter() - started
            out[f"concurrent{count}_tps"] = sum(r.tokens for r in together) / together_s
            out[f"concurrent{count}_p95_ttft_ms"] = p95([r.ttft_s for r in together]) * 1000
            if sequential:
                out["sequential8_tps"] = sum(r.tokens for r in sequential) / sequential_s

        # B's questions are new in both phases (numbered), so neither phase hits the prefix cache.
        alone = [await stream(inference, chat(None, f"Question {i}: {q}"), 16, common_pb2.PRIORITY_INTERACTIVE, "tenant-b")
                 for i, q in enumerate(QUESTIONS[:5])]
        out["fair_b_alone_p95_ttft_ms"] = p95([r.ttft_s for r in alone]) * 1000
        flood = [asyncio.ensure_future(stream(inference, chat(None, QUESTIONS[i % 8]), args.flood_tokens,
                                              common_pb2.PRIORITY_BATCH, "tenant-a")) for i in range(args.flood)]
        await asyncio.sleep(1.0)
        loaded = []
        for i, q in enumerate(QUESTIONS[:5], start=5):
            loaded.append(await stream(inference, chat(None, f"Question {i}: {q}"), 16, common_pb2.PRIORITY_INTERACTIVE,
                                       "tenant-b"))
        out["fair_b_loaded_p95_ttft_ms"] = p95([r.ttft_s for r in loaded]) * 1000
        await asyncio.gather(*flood)
    return out


def llama_benchmarks(args: argparse.Namespace) -> dict[str, float]:
    from llama_cpp import Llama

    tokenizer = ModelTokenizer.from_dir(artefact_dir(args.home, "smollm2-135m-instruct"))
    llm = Llama(model_path=str(locate_source(get_spec("smollm2-135m-instruct")).path), n_threads=args.threads,
                n_ctx=2048, verbose=False)

    def prompt(system: str | None, question: str) -> str:
        return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in chat(system, question)], True)

    llama_stream(llm, prompt(None, "Hello"), 4)
    # Each question differs from the previous prompt after the template's shared head, as in the service runs.
    single = [llama_stream(llm, prompt(None, q), args.max_new) for q in QUESTIONS[:3]]
    llama_stream(llm, prompt(SYSTEM, QUESTIONS[0]), 2)
    cached = [llama_stream(llm, prompt(SYSTEM, q), 2) for q in QUESTIONS[1:4]]
    llm.reset()
    cold = llama_stream(llm, prompt(SYSTEM, QUESTIONS[4]), 2)
    return {
        "single_decode_tps": float(np.median([r.decode_rate for r in single])),
        "single_ttft_ms": float(np.median([r.ttft_s for r in single])) * 1000,
        "prefix_ttft_ms": float(np.median([r.ttft_s for r in cached])) * 1000,
        "prefix_cold_ttft_ms": cold.ttft_s * 1000,
        "prompt_tokens_with_prefix": float(len(tokenizer.encode_markup(prompt(SYSTEM, QUESTIONS[1])).ids)),
    }


# llama.cpp's OpenMP threads spin at barriers by default, which is fastest on idle cores and
# collapses (50x here) when other processes share them; both policies run, the faster counts.
OMP_WAIT_POLICIES = ("", "PASSIVE")
LOWER_IS_BETTER = ("single_ttft_ms", "prefix_ttft_ms", "prefix_cold_ttft_ms")


def reference_in_subprocess(args: argparse.Namespace) -> dict[str, float]:
    """llama.cpp in a child process: a wheel built for other CPU features dies with SIGILL, and
    the service figures are still worth having then."""
    command = [sys.executable, "-m", "bench.generate", "--llama-only", "--threads", str(args.threads),
               "--home", str(args.home), "--max-new", str(args.max_new)]
    runs: list[dict[str, float]] = []
    for policy in OMP_WAIT_POLICIES:
        env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        child = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
        if child.returncode != 0:
            print(f"llama.cpp reference unavailable (exit {child.returncode}): {child.stderr.strip()[-300:]}")
            return {}
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    best = {key: (min if key in LOWER_IS_BETTER else max)(run[key] for run in runs) for key in runs[0]}
    for policy, run in zip(OMP_WAIT_POLICIES, runs, strict=True):
        best[f"decode_tps_omp_{(policy or 'default').lower()}"] = run["single_decode_tps"]
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generate")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--home", type=Path, default=REPO / ".llmos")
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--wide", type=int, default=32, help="the larger concurrent run")
    parser.add_argument("--flood", type=int, default=50)
    parser.add_argument("--flood-tokens", type=int, default=32)
    parser.add_argument("--no-thread-spinning", dest="thread_spinning", action="store_false",
                        help="stop the service's idle ONNX Runtime threads spinning (faster on oversubscribed cores)")
    parser.add_argument("--llama-only", action="store_true", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    if args.llama_only:
        print(json.dumps(llama_benchmarks(args)))
        return 0

    load_before = os.getloadavg()[0]
    llama = reference_in_subprocess(args)
    with inference_service(args.home, {"LLMOS_INFERENCE_THREADS": str(args.threads),
                                       "LLMOS_INFERENCE_THREAD_SPINNING": str(args.thread_spinning).lower(),
                                       "LLMOS_INFERENCE_QUEUE_SIZE": str(max(64, args.flood + args.wide))}) as addr:
        served = asyncio.run(service_benchmarks(addr, args))

    nan = float("nan")
    for key in ("single_decode_tps", "single_ttft_ms", "prefix_ttft_ms", "prefix_cold_ttft_ms", "prompt_tokens_with_prefix"):
        llama.setdefault(key, nan)
    rows = [
        ("single stream decode tokens/s", f"{served['single_decode_tps']:.1f}", f"{llama['single_decode_tps']:.1f}",
         f"{served['single_decode_tps'] / llama['single_decode_tps']:.2f}x", ">= 1.4x"),
        ("single stream TTFT ms", f"{served['single_ttft_ms']:.1f}", f"{llama['single_ttft_ms']:.1f}",
         f"{served['single_ttft_ms'] / llama['single_ttft_ms']:.2f}x", "-"),
        (f"TTFT ms, repeated {llama['prompt_tokens_with_prefix']:.0f}-token prefix (llama: prompt cache)",
         f"{served['prefix_ttft_ms']:.1f}", f"{llama['prefix_ttft_ms']:.1f}",
         f"{served['prefix_ttft_ms'] / llama['prefix_ttft_ms']:.2f}x", "<= 1.0x"),
        ("TTFT ms, the same prompt cold", f"{served['prefix_cold_ttft_ms']:.1f}", f"{llama['prefix_cold_ttft_ms']:.1f}",
         f"{served['prefix_cold_ttft_ms'] / llama['prefix_cold_ttft_ms']:.2f}x", "-"),
        ("8 streams aggregate tokens/s vs 8 sequential", f"{served['concurrent8_tps']:.1f}",
         f"{served['sequential8_tps']:.1f} (service, sequential)",
         f"{served['concurrent8_tps'] / served['sequential8_tps']:.2f}x", ">= 2.5x"),
        ("8 streams p95 TTFT ms", f"{served['concurrent8_p95_ttft_ms']:.0f}", "-", "-", "report"),
        (f"{args.wide} streams aggregate tokens/s", f"{served[f'concurrent{args.wide}_tps']:.1f}", "-",
         f"{served[f'concurrent{args.wide}_tps'] / served['sequential8_tps']:.2f}x", "report"),
        (f"{args.wide} streams p95 TTFT ms", f"{served[f'concurrent{args.wide}_p95_ttft_ms']:.0f}", "-", "-", "report"),
        (f"fairness: B p95 TTFT ms under A's {args.flood} batch requests", f"{served['fair_b_loaded_p95_ttft_ms']:.0f}",
         f"{served['fair_b_alone_p95_ttft_ms']:.0f} (B alone)",
         f"{served['fair_b_loaded_p95_ttft_ms'] / served['fair_b_alone_p95_ttft_ms']:.2f}x", "<= 2.0x"),
    ]
    load_after = os.getloadavg()[0]
    print_table(f"Generation through gRPC, {args.threads} threads, greedy, max_new_tokens={args.max_new}; "
                f"load average {load_before:.1f} before, {load_after:.1f} after on {os.cpu_count()} cores",
                ("measure", "service", "reference", "ratio", "target"), rows)
    path = write_results("generate", {"threads": args.threads, "max_new_tokens": args.max_new,
                                      "thread_spinning": args.thread_spinning,
                                      "load_average": {"before": load_before, "after": load_after},
                                      "service": served, "llama_cpp": llama})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
