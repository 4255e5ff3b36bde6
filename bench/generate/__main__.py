"""Generation benchmarks through the gRPC service, with llama.cpp (llama-cpp-python built for this
CPU, the same GGUF, the same threads, the same prompt tokens, greedy) as the reference measured in
the same run.

The engines alternate in rounds (platform, reference, platform, reference, ...: bench.generate.rounds);
in each round both run, on prompts new to the round (numbered, so no prompt cache holds them):
1. single stream: decode tokens/s and time to first token (TTFT) over eight questions;
2. a ~300-token system prefix new to the round: TTFT of its first prompt (cold) and of three more
   with the same prefix (platform: its prefix cache; llama.cpp: its prompt cache).
Each ratio is taken per round and reported as its spread over the rounds (min, median, max; p5/p95
in the JSON). The first 32 greedy tokens of the two engines are compared on every prompt: the
served int4 ONNX model is requantized from the Q4_1 GGUF llama.cpp reads, so the two may part after
some tokens; how many prompts agree, and where the others first differ, is reported, not failed
(bench.generate.fidelity scores each served variant against the GGUF's own weights).

Then the service alone:
3. concurrent rounds: 8 requests one after another, 8 together and `--wide` together, each on
   prompts no request before used, so the prefix cache has nothing to reuse but the chat template's
   head; what a cache could have reused is computed from the prompts and reported beside the figures
   (the service exports no prefix-cache metric: cached prompt tokens are only a span attribute);
   for each set, the scheduler's per-step profile from the service's metrics (bench.generate.profile:
   decode steps, mean batch, mean step time, the scheduler thread's wall and CPU seconds in admission
   and prefill, the model's decode runs, sampling and delivery), in the JSON per concurrent round;
4. fairness: tenant A floods batch requests while tenant B sends interactive ones.

Load: for the run and for each round, the 1-minute load average before and after, and the cores
that processes outside the benchmark used meanwhile (bench.common.LoadWindow); a run or round above
a load of 1.0 is marked noisy in the table and the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import LoadWindow, free_port, spread
from bench.generate.bandwidth import decode_limit, read_bandwidth_gb_s, weights_bytes
from bench.generate.profile import PHASES, scrape, step_profile
from bench.generate.reference import Reference, ReferenceUnavailable, ensure_native
from bench.generate.rounds import GREEDY_TOKENS, PLATFORM, agreement, first_divergence, interleaved_order, prefix_cache_exposure
from bench.inference.service import METADATA, REPO, inference_service, print_table, write_results
from llmos.clients import InferenceClient
from llmos.models.catalog import get_spec, locate_source
from llmos.models.store import artefact_dir
from llmos.tokenization import ModelTokenizer
from llmos.v1 import common_pb2, inference_pb2
from services.inference.settings import InferenceSettings

MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?", "Write a short poem about the sea.", "How do I return a parcel?",
    "Explain what a battery does.", "Give me three tips for sleeping well.", "What is photosynthesis?",
    "Describe a cat in two sentences.", "Why is the sky blue?",
]
# The concurrent runs' questions: none of the single-stream ones.
CONCURRENT_QUESTIONS = [
    "Name three rivers in Europe.", "How does a bicycle stay upright?", "What is a prime number?",
    "Suggest a name for a bakery.", "Why do leaves change colour?", "How do I boil an egg?",
    "What does a compiler do?", "Describe the moon in one sentence.",
]
SYSTEM = (
    "You are the customer-service assistant of Northwind, an online shop. Answer only from the help "
    "centre: returns are free within 30 days, refunds take five working days, shipping takes two to four "
    "days in Europe and up to ten days elsewhere, gift cards never expire, and orders can be changed "
    "until they are packed. Be brief, polite and precise; when you do not know, say so and offer a human. "
) * 3
# Who asks in each round: a name early in the user turn makes every round's prompts new to both
# engines' prompt caches while the question stays plain (a number there sends this small model
# counting: "1.1.1.1").
ASKERS = ("Anna", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonas",
          "Karin", "Leo", "Maya", "Nils", "Olga", "Pablo", "Rosa", "Sven", "Tara", "Victor")
PREFIXED = 3  # prompts after the cold one that share its system prefix
COLD = "prefix-cold"


@dataclass
class StreamResult:
    ttft_s: float
    total_s: float
    token_ids: list[int]
    prompt_tokens: int = 0  # as the engine counted them (the service's usage), 0: not told

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_rate(self) -> float:
        return (self.tokens - 1) / (self.total_s - self.ttft_s) if self.tokens > 1 else 0.0


@dataclass
class Prompt:
    label: str
    messages: list[common_pb2.ChatMessage]
    ids: list[int]
    max_new: int


@dataclass
class PromptLog:
    """Every prompt the service saw from the benchmark's tenant, in order: what its prefix cache could hold."""

    ids: list[list[int]] = field(default_factory=list)

    def exposure(self, prompts: Sequence[list[int]], min_tokens: int) -> dict[str, int]:
        found = prefix_cache_exposure(prompts, self.ids, min_tokens)
        self.ids.extend(prompts)
        return found


def chat(system: str | None, question: str) -> list[common_pb2.ChatMessage]:
    messages = [common_pb2.ChatMessage(role="system", content=system)] if system else []
    return [*messages, common_pb2.ChatMessage(role="user", content=question)]


def prompt_ids(tokenizer: ModelTokenizer, messages: list[common_pb2.ChatMessage]) -> list[int]:
    """The tokens the service makes of a chat (the same call), given to llama.cpp as they are."""
    return list(tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in messages], True).ids)


def round_prompts(tokenizer: ModelTokenizer, number: int, max_new: int) -> list[Prompt]:
    """One round's prompts, the same for both engines; numbered by round so none was seen before."""
    system = f"Conversation {number}. {SYSTEM}"
    chats = [(f"single:{i}", chat(None, f"{ASKERS[number - 1]} here. {q}"), max_new) for i, q in enumerate(QUESTIONS)]
    chats.append((COLD, chat(system, QUESTIONS[0]), GREEDY_TOKENS))
    chats += [(f"prefix:{i}", chat(system, q), GREEDY_TOKENS) for i, q in enumerate(QUESTIONS[1:1 + PREFIXED], start=1)]
    return [Prompt(label, messages, prompt_ids(tokenizer, messages), budget) for label, messages, budget in chats]


async def stream(inference: InferenceClient, messages: list[common_pb2.ChatMessage], max_new: int,
                 priority: common_pb2.Priority.ValueType = common_pb2.PRIORITY_STANDARD, tenant: str = "") -> StreamResult:
    request = inference_pb2.GenerateRequest(
        messages=inference_pb2.ChatMessages(messages=messages), priority=priority, tenant=tenant,
        sampling=inference_pb2.SamplingParams(max_new_tokens=max_new),
    )
    started = time.perf_counter()
    first = 0.0
    token_ids: list[int] = []
    prompt_tokens = 0
    async for response in inference.generate(request, timeout_s=900):
        if response.token_ids and not first:
            first = time.perf_counter() - started
        token_ids.extend(response.token_ids)
        prompt_tokens = response.usage.prompt_tokens or prompt_tokens
    return StreamResult(first, time.perf_counter() - started, token_ids, prompt_tokens)


def engine_figures(results: dict[str, StreamResult]) -> dict[str, float]:
    """One round of one engine: medians over its single-stream prompts, its cold and cached prefix TTFT."""
    single = [r for label, r in results.items() if label.startswith("single:")]
    cached = [r for label, r in results.items() if label.startswith("prefix:")]
    return {
        "single_decode_tps": float(np.median([r.decode_rate for r in single if r.tokens > 1])),
        "single_ttft_ms": float(np.median([r.ttft_s for r in single])) * 1000,
        "prefix_cold_ttft_ms": results[COLD].ttft_s * 1000,
        "prefix_ttft_ms": float(np.median([r.ttft_s for r in cached])) * 1000,
    }


async def platform_round(inference: InferenceClient, prompts: list[Prompt]) -> dict[str, StreamResult]:
    return {prompt.label: await stream(inference, prompt.messages, prompt.max_new) for prompt in prompts}


def reference_round(reference: Reference, prompts: list[Prompt]) -> dict[str, StreamResult]:
    results = {}
    for prompt in prompts:
        # The cold prompt starts from an empty cache; the prefixed ones after it reuse its prefix.
        answer = reference.generate(prompt.ids, prompt.max_new, reset=prompt.label == COLD)
        results[prompt.label] = StreamResult(answer["ttft_s"], answer["total_s"], answer["tokens"], len(prompt.ids))
    return results


async def concurrent_round(inference: InferenceClient, tokenizer: ModelTokenizer, number: int, args: argparse.Namespace,
                           log: PromptLog, min_tokens: int, metrics_addr: str) -> dict[str, Any]:
    """8 requests one after another, 8 together, `--wide` together: each set on prompts of its own."""
    def requests(set_name: str, count: int) -> list[list[common_pb2.ChatMessage]]:
        # What tells the prompts apart comes first (request, set, round), right after the template's head.
        return [chat(None, f"#{i}{set_name}{number} {CONCURRENT_QUESTIONS[i % len(CONCURRENT_QUESTIONS)]}")
                for i in range(count)]

    out: dict[str, Any] = {"prefix_cache": {}}
    for kind, count, together in (("sequential8", 8, False), ("concurrent8", 8, True), (f"concurrent{args.wide}", args.wide, True)):
        chats = requests(kind[0] + ("w" if count == args.wide and together else ""), count)
        out["prefix_cache"][kind] = log.exposure([prompt_ids(tokenizer, m) for m in chats], min_tokens)
        scheduler_before = scrape(metrics_addr)
        started = time.perf_counter()
        if together:
            results = await asyncio.gather(*(stream(inference, m, args.max_new) for m in chats))
        else:
            results = [await stream(inference, m, args.max_new) for m in chats]
        out[f"{kind}_tps"] = sum(r.tokens for r in results) / (time.perf_counter() - started)
        out[f"{kind}_scheduler"] = step_profile(scheduler_before, scrape(metrics_addr))
        out[f"{kind}_p95_ttft_ms"] = float(np.percentile([r.ttft_s for r in results], 95)) * 1000
    out["concurrent8_vs_sequential8"] = out["concurrent8_tps"] / out["sequential8_tps"]
    out[f"concurrent{args.wide}_vs_sequential8"] = out[f"concurrent{args.wide}_tps"] / out["sequential8_tps"]
    return out


async def fairness(inference: InferenceClient, args: argparse.Namespace) -> dict[str, float]:
    # B's questions are new in both phases (numbered), so neither phase hits the prefix cache.
    alone = [await stream(inference, chat(None, f"Question {i}: {q}"), 16, common_pb2.PRIORITY_INTERACTIVE, "tenant-b")
             for i, q in enumerate(QUESTIONS[:5])]
    flood = [asyncio.ensure_future(stream(inference, chat(None, f"Batch {i}: {QUESTIONS[i % 8]}"), args.flood_tokens,
                                          common_pb2.PRIORITY_BATCH, "tenant-a")) for i in range(args.flood)]
    await asyncio.sleep(1.0)
    loaded = [await stream(inference, chat(None, f"Question {i}: {q}"), 16, common_pb2.PRIORITY_INTERACTIVE, "tenant-b")
              for i, q in enumerate(QUESTIONS[:5], start=5)]
    await asyncio.gather(*flood)
    return {"b_alone_p95_ttft_ms": float(np.percentile([r.ttft_s for r in alone], 95)) * 1000,
            "b_loaded_p95_ttft_ms": float(np.percentile([r.ttft_s for r in loaded], 95)) * 1000}


async def run(addr: str, metrics_addr: str, reference: Reference | None, tokenizer: ModelTokenizer,
              args: argparse.Namespace) -> dict[str, Any]:
    min_tokens = InferenceSettings.model_fields["inference_prefix_cache_min_tokens"].default
    log = PromptLog()
    rounds: list[dict[str, Any]] = []
    greedy: list[dict[str, Any]] = []
    async with grpc.aio.insecure_channel(addr) as channel:
        inference = InferenceClient(channel, METADATA)
        await stream(inference, chat(None, "Hello"), 4)  # warm-up
        if reference is not None:
            reference.generate(prompt_ids(tokenizer, chat(None, "Hello")), 4)
        log.ids.append(prompt_ids(tokenizer, chat(None, "Hello")))
        by_round: dict[int, dict[str, dict[str, StreamResult]]] = {}
        for number, engine in interleaved_order(args.rounds):
            if engine != PLATFORM and reference is None:
                continue
            prompts = round_prompts(tokenizer, number, args.max_new)
            await asyncio.sleep(args.settle_s)  # the other engine's idle threads stop spinning
            window = LoadWindow()
            if engine == PLATFORM:
                # In the order they are sent: the single-stream prompts, then the prefixed ones
                # (after the cold one, those are meant to hit).
                exposure = {kind: log.exposure([p.ids for p in prompts if p.label.startswith(start)], min_tokens)
                            for kind, start in (("single", "single:"), ("prefix", "prefix"))}
                results = await platform_round(inference, prompts)
            else:
                exposure = {}
                results = await asyncio.to_thread(reference_round, reference, prompts)  # type: ignore[arg-type]
            by_round.setdefault(number, {})[engine] = results
            rounds.append({"round": number, "engine": engine, **engine_figures(results), **window.close(),
                           **({"prefix_cache": exposure} if exposure else {}),
                           "prompt_tokens_counted_otherwise": sum(
                               1 for p in prompts if results[p.label].prompt_tokens not in (0, len(p.ids)))})
        for number, engines in by_round.items():
            if len(engines) < 2:
                continue
            for prompt in round_prompts(tokenizer, number, args.max_new):
                ours, theirs = engines[PLATFORM][prompt.label].token_ids, engines["reference"][prompt.label].token_ids
                position = first_divergence(ours, theirs)
                row: dict[str, Any] = {"round": number, "prompt": prompt.label, "first_divergence": position}
                if position is not None and position < min(len(ours), len(theirs)) and reference is not None:
                    # A near tie in llama.cpp's own logits says the engines part on quantization noise.
                    probe = reference.probe([*prompt.ids, *theirs[:position]], ours[position], theirs[position])
                    row["reference_logit_gap"] = probe["reference_logit"] - probe["platform_logit"]
                    row["platform_token_rank_in_reference"] = probe["platform_token_rank"]
                if number == 1:
                    row |= {"platform_text": tokenizer.decode(ours[:GREEDY_TOKENS]), "reference_text": tokenizer.decode(theirs[:GREEDY_TOKENS])}
                greedy.append(row)
        concurrent = []
        for number in range(1, args.concurrent_rounds + 1):
            window = LoadWindow()
            concurrent.append({"round": number, **await concurrent_round(inference, tokenizer, number, args, log, min_tokens, metrics_addr),
                               **window.close()})
        fair: dict[str, Any] = {}
        if args.flood:
            window = LoadWindow()
            fair = {**await fairness(inference, args), **window.close()}
    return {"rounds": rounds, "greedy": greedy, "concurrent": concurrent, "fairness": fair}


def summarize(measured: dict[str, Any], wide: int) -> dict[str, Any]:
    """Spreads over rounds of each engine's figures, of the per-round ratios, and of the concurrent runs."""
    rounds = measured["rounds"]
    figures = ("single_decode_tps", "single_ttft_ms", "prefix_ttft_ms", "prefix_cold_ttft_ms")
    per_engine = {engine: {key: spread([r[key] for r in rounds if r["engine"] == engine]) for key in figures}
                  for engine in (PLATFORM, "reference")}
    pairs = [(p, r) for p in rounds if p["engine"] == PLATFORM
             for r in rounds if r["engine"] == "reference" and r["round"] == p["round"]]
    ratios = {key: spread([p[key] / r[key] for p, r in pairs]) for key in figures}
    concurrent_keys = ("sequential8_tps", "concurrent8_tps", f"concurrent{wide}_tps", "concurrent8_p95_ttft_ms",
                       f"concurrent{wide}_p95_ttft_ms", "concurrent8_vs_sequential8", f"concurrent{wide}_vs_sequential8")
    concurrent = {key: spread([c[key] for c in measured["concurrent"]]) for key in concurrent_keys}
    exposure: dict[str, dict[str, int]] = {}
    for item in [r for r in rounds if "prefix_cache" in r] + measured["concurrent"]:
        for kind, found in item["prefix_cache"].items():
            total = exposure.setdefault(kind, {"prompts": 0, "could_hit": 0, "longest_shared_prefix_tokens": 0})
            total["prompts"] += found["prompts"]
            total["could_hit"] += found["could_hit"]
            total["longest_shared_prefix_tokens"] = max(total["longest_shared_prefix_tokens"], found["longest_shared_prefix_tokens"])
    return {"platform": per_engine[PLATFORM], "llama_cpp": per_engine["reference"], "ratios": ratios,
            "concurrent": concurrent, "prefix_cache_exposure": exposure,
            "greedy_agreement": {**agreement(row["first_divergence"] for row in measured["greedy"]), **near_ties(measured["greedy"])}}


def near_ties(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the engines part: how far the platform's token trails llama.cpp's in llama.cpp's own logits."""
    probed = [row for row in rows if "reference_logit_gap" in row]
    return {
        "probed": len(probed),
        "platform_token_second_in_reference": sum(1 for row in probed if row["platform_token_rank_in_reference"] == 1),
        "reference_logit_gap_median": float(np.median([row["reference_logit_gap"] for row in probed])) if probed else None,
    }


def cell(figure: dict[str, float], digits: int = 1) -> str:
    return f"{figure['median']:.{digits}f}" if figure else "-"


def ratio_cell(figure: dict[str, float]) -> str:
    return f"{figure['median']:.2f}x [{figure['min']:.2f}, {figure['max']:.2f}]" if figure else "-"


def report(summary: dict[str, Any], measured: dict[str, Any], run_load: dict[str, Any], args: argparse.Namespace) -> None:
    ours, theirs, ratios, conc = summary["platform"], summary["llama_cpp"], summary["ratios"], summary["concurrent"]
    wide = args.wide
    rows = [
        ("single stream decode tokens/s", cell(ours["single_decode_tps"]), cell(theirs["single_decode_tps"]),
         ratio_cell(ratios["single_decode_tps"]), ">= 1.4x"),
        ("single stream decode, share of the memory-bandwidth limit",
         f"{summary['bandwidth']['single_decode_fraction_of_limit']:.0%} of {summary['bandwidth']['limit_tps']:.0f}",
         "-", "-", f"report ({summary['bandwidth']['read_bandwidth_gb_s']:.1f} GB/s / {summary['bandwidth']['weights_mb']:.0f} MB)"),
        ("single stream TTFT ms", cell(ours["single_ttft_ms"]), cell(theirs["single_ttft_ms"]), ratio_cell(ratios["single_ttft_ms"]), "-"),
        ("TTFT ms, repeated ~300-token prefix (llama: prompt cache)", cell(ours["prefix_ttft_ms"]), cell(theirs["prefix_ttft_ms"]),
         ratio_cell(ratios["prefix_ttft_ms"]), "<= 1.0x"),
        ("TTFT ms, the same prefix cold", cell(ours["prefix_cold_ttft_ms"]), cell(theirs["prefix_cold_ttft_ms"]),
         ratio_cell(ratios["prefix_cold_ttft_ms"]), "-"),
        ("8 streams aggregate tokens/s vs 8 sequential", cell(conc["concurrent8_tps"]),
         f"{cell(conc['sequential8_tps'])} (service, sequential)", ratio_cell(conc["concurrent8_vs_sequential8"]), ">= 2.5x"),
        ("8 streams p95 TTFT ms", cell(conc["concurrent8_p95_ttft_ms"], 0), "-", "-", "report"),
        (f"{wide} streams aggregate tokens/s vs 8 sequential", cell(conc[f"concurrent{wide}_tps"]), "-",
         ratio_cell(conc[f"concurrent{wide}_vs_sequential8"]), ">= 3x"),
        (f"{wide} streams p95 TTFT ms", cell(conc[f"concurrent{wide}_p95_ttft_ms"], 0), "-", "-", "report"),
    ]
    fair = measured["fairness"]
    if fair:
        rows.append((f"fairness: B p95 TTFT ms under A's {args.flood} batch requests", f"{fair['b_loaded_p95_ttft_ms']:.0f}",
                     f"{fair['b_alone_p95_ttft_ms']:.0f} (B alone)",
                     f"{fair['b_loaded_p95_ttft_ms'] / fair['b_alone_p95_ttft_ms']:.2f}x", "<= 2.0x"))
    mark = "  ** NOISY: load above 1.0 **" if run_load["noisy"] else ""
    print_table(f"Generation through gRPC, {args.threads} threads, greedy, max_new_tokens={args.max_new}, {args.rounds} interleaved "
                f"rounds + {args.concurrent_rounds} concurrent; medians, ratios median [min, max] over rounds; load average "
                f"{run_load['load_average_1m_before']:.1f} before, {run_load['load_average_1m_after']:.1f} after on {os.cpu_count()} "
                f"cores, other processes {run_load['other_processes_cores']:.2f} cores{mark}",
                ("measure", "service", "reference", "ratio", "target"), rows)
    print("\nrounds (load average 1 min before/after; cores other processes used; NOISY above 1.0)")
    for item in measured["rounds"] + [{"engine": "concurrent", **c} for c in measured["concurrent"]]:
        print(f"  round {item['round']:>2} {item['engine']:<10} load {item['load_average_1m_before']:.1f}/{item['load_average_1m_after']:.1f}"
              f"  others {item['other_processes_cores']:.2f}{'  NOISY' if item['noisy'] else ''}")
    greedy = summary["greedy_agreement"]
    print(f"\ngreedy tokens: {greedy['agree_fully']} of {greedy['prompts']} prompts agree on the first {GREEDY_TOKENS} tokens;"
          f" the others first differ at {greedy['first_divergence_positions']}")
    if greedy["probed"]:
        print(f"  there, the platform's token is llama.cpp's second choice in {greedy['platform_token_second_in_reference']} of"
              f" {greedy['probed']}, a median {greedy['reference_logit_gap_median']:.2f} logits below its first"
              " (the ONNX int4 weights are requantized from the Q4_1 GGUF)")
    if measured["concurrent"]:
        last = measured["concurrent"][-1]
        print(f"\nscheduler per-step profile, concurrent round {last['round']} (scheduler thread: wall s / CPU s per phase)")
        for kind in ("sequential8", "concurrent8", f"concurrent{args.wide}"):
            profile = last[f"{kind}_scheduler"]
            phases = "  ".join(f"{phase} {profile['wall_s'][phase]:.2f}/{profile['thread_cpu_s'][phase]:.2f}" for phase in PHASES)
            print(f"  {kind:<14} {profile['decode_steps']:>4} steps, mean batch {profile['mean_batch']:.2f}, "
                  f"step {profile['step_ms_mean']:.1f} ms; {phases}")
    print("prefix cache: the service exports no hit count; prompts sharing >= the cache's minimum prefix with an earlier one:")
    for kind, found in summary["prefix_cache_exposure"].items():
        print(f"  {kind:<16} {found['could_hit']} of {found['prompts']} (longest shared prefix {found['longest_shared_prefix_tokens']} tokens)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--home", type=Path, default=REPO / ".llmos")
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved platform/reference rounds")
    parser.add_argument("--concurrent-rounds", type=int, default=3)
    parser.add_argument("--wide", type=int, default=32, help="the larger concurrent run")
    parser.add_argument("--flood", type=int, default=50, help="fairness: tenant A's batch requests (0: skip)")
    parser.add_argument("--flood-tokens", type=int, default=32)
    parser.add_argument("--settle-s", type=float, default=1.0, help="pause before each engine's turn")
    parser.add_argument("--omp-wait-policy", default="", help="llama.cpp's OMP_WAIT_POLICY (default: its own, spinning)")
    parser.add_argument("--no-build-reference", dest="build_reference", action="store_false",
                        help="use the installed llama-cpp-python as it is (default: build it for this CPU first when it "
                             "is missing or lacks an instruction set this CPU has; minutes)")
    parser.add_argument("--no-thread-spinning", dest="thread_spinning", action="store_false",
                        help="stop the service's idle ONNX Runtime threads spinning (faster on oversubscribed cores)")
    args, _ = parser.parse_known_args(argv)
    if args.wide == 8:
        parser.error("--wide must differ from 8: the 8-stream run is always measured")
    if not 0 < args.rounds <= len(ASKERS):
        parser.error(f"--rounds must be 1..{len(ASKERS)}: each round's prompts start with a name of its own")
    if args.max_new < GREEDY_TOKENS:
        parser.error(f"--max-new must be at least {GREEDY_TOKENS}: the engines' first {GREEDY_TOKENS} greedy tokens are compared")

    run_window = LoadWindow()
    bandwidth = read_bandwidth_gb_s(args.threads)  # before anything else runs
    tokenizer = ModelTokenizer.from_dir(artefact_dir(args.home, MODEL))
    gguf = locate_source(get_spec(MODEL)).path
    reference: Reference | None = None
    if args.build_reference:
        ensure_native()
    try:
        reference = Reference(gguf, args.threads, args.omp_wait_policy)
        reference_info: dict[str, Any] = {**reference.info, "omp_wait_policy": args.omp_wait_policy or "default"}
        reference_info.pop("ready", None)
    except ReferenceUnavailable as exc:
        print(f"llama.cpp reference unavailable: {exc} (build it: python -m bench.generate.reference --build)")
        reference_info = {"unavailable": str(exc)}
    try:
        metrics_addr = f"127.0.0.1:{free_port()}"
        # The wide run's streams decode together: the platform's default is 8 slots (at 2,048
        # tokens of context, 94 MB of KV cache each); the bench's prompts fit in 1,024.
        with inference_service(args.home, {"LLMOS_INFERENCE_THREADS": str(args.threads),
                                           "LLMOS_INFERENCE_MAX_BATCH": str(max(8, args.wide)),
                                           "LLMOS_INFERENCE_MAX_CONTEXT": "1024",
                                           "LLMOS_INFERENCE_METRICS_ADDR": metrics_addr,
                                           "LLMOS_INFERENCE_THREAD_SPINNING": str(args.thread_spinning).lower(),
                                           "LLMOS_INFERENCE_QUEUE_SIZE": str(max(64, args.flood + args.wide))}) as addr:
            measured = asyncio.run(run(addr, metrics_addr, reference, tokenizer, args))
    finally:
        if reference is not None:
            reference.close()
    run_load = run_window.close()
    run_load["noisy"] = run_load["noisy"] or any(item["noisy"] for item in measured["rounds"] + measured["concurrent"])
    summary = summarize(measured, args.wide)
    summary["bandwidth"] = decode_limit(bandwidth, weights_bytes(artefact_dir(args.home, MODEL)),
                                        summary["platform"]["single_decode_tps"]["median"])
    report(summary, measured, run_load, args)
    path = write_results("generate", {
        "threads": args.threads, "max_new_tokens": args.max_new, "thread_spinning": args.thread_spinning,
        "rounds": args.rounds, "concurrent_rounds": args.concurrent_rounds, "cpus": os.cpu_count(),
        "noisy": run_load["noisy"], "load": run_load, "model": {"platform": f"{MODEL} cpu-int4 (ONNX)", "reference": gguf.name},
        "reference_build": reference_info, **summary, "fairness": measured["fairness"], "per_round": measured["rounds"],
        "per_concurrent_round": measured["concurrent"], "greedy_per_prompt": measured["greedy"],
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
