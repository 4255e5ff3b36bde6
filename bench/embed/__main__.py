"""Sentences/s for N texts through the inference service's Embed against sentence-transformers
on the same checkpoint (torch CPU, same threads), with the cosine between the two.

Texts: BANKING77 training queries and SciFact abstracts from /work/shared/data (short and long,
as the platform sees them: queries and chunks). The texts are cut into `--rounds` slices, each
with both kinds, and every path embeds each slice in turn (reference, direct, served): on a
machine shared with other work the paths then see the same load, and the ratios hold better
than three runs minutes apart. The load average at the start and end is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from bench.inference.service import METADATA, REPO, inference_service, print_table, write_results
from llmos.clients import InferenceClient
from llmos.embedding import EmbeddingModel
from llmos.models.catalog import get_spec, locate_source
from llmos.models.store import artefact_dir
from llmos.settings import ExecutionProvider
from llmos.v1 import common_pb2
from services.inference.devices import device_plan
from services.inference.settings import InferenceDevice

DATA = Path("/work/shared/data")
CALL_TEXTS = 64


def rounds_of(texts: list[str], rounds: int) -> list[list[int]]:
    """Indices of `texts` in `rounds` interleaved slices, so each slice mixes queries and abstracts."""
    return [list(range(start, len(texts), rounds)) for start in range(rounds)]


def load_texts(count: int) -> list[str]:
    with (DATA / "banking77" / "train.csv").open(encoding="utf-8", newline="") as handle:
        queries = [row["text"] for row in csv.DictReader(handle)]
    with (DATA / "scifact" / "corpus.jsonl").open(encoding="utf-8") as handle:
        abstracts = [json.loads(line)["text"] for line in handle]
    half = count // 2
    return queries[:half] + abstracts[:count - half]


async def embed_through_service(inference: InferenceClient, texts: list[str], concurrency: int) -> np.ndarray:
    limit = asyncio.Semaphore(concurrency)

    async def call(part: list[str]) -> np.ndarray:
        async with limit:
            return await inference.embed(part, 600, priority=common_pb2.PRIORITY_BATCH)

    parts = [texts[i:i + CALL_TEXTS] for i in range(0, len(texts), CALL_TEXTS)]
    return np.concatenate(await asyncio.gather(*(call(part) for part in parts)))


def timed(embed: Callable[[list[str]], np.ndarray], texts: list[str]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    vectors = embed(texts)
    return vectors, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.embed")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved slices (see the module docstring)")
    parser.add_argument("--home", type=Path, default=REPO / ".llmos")
    parser.add_argument("--device", choices=[device.value for device in InferenceDevice], default="cpu",
                        help="LLMOS_INFERENCE_DEVICE of the service and the direct path; the reference runs on cuda too when torch has it")
    parser.add_argument("--results", default="embed", help="writes bench/results/RESULTS.json")
    args, _ = parser.parse_known_args(argv)
    providers = device_plan(InferenceDevice(args.device), ExecutionProvider.AUTO).embedding_providers
    texts = load_texts(args.count)

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    reference_device = "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    reference_model = SentenceTransformer(str(locate_source(get_spec("all-minilm-l6-v2")).path), device=reference_device)
    direct_model = EmbeddingModel.from_dir(artefact_dir(args.home, "all-minilm-l6-v2"), providers, threads=args.threads)
    paths: dict[str, Callable[[list[str]], np.ndarray]] = {
        "reference": lambda part: reference_model.encode(part, batch_size=64, normalize_embeddings=True),
        "direct": lambda part: direct_model.embed_sorted(part, batch_size=64),
    }
    load_before = os.getloadavg()
    seconds = dict.fromkeys([*paths, "served"], 0.0)
    vectors = {name: np.zeros((len(texts), direct_model.dimension), dtype=np.float32) for name in seconds}
    with inference_service(args.home, {"LLMOS_INFERENCE_THREADS": str(args.threads), "LLMOS_INFERENCE_DEVICE": args.device}) as addr:

        async def served_rounds() -> None:
            async with grpc.aio.insecure_channel(addr) as channel:
                inference = InferenceClient(channel, METADATA)
                await embed_through_service(inference, texts[:8], 1)  # warm-up
                for embed in paths.values():
                    embed(texts[:8])
                for number, indices in enumerate(rounds_of(texts, args.rounds), start=1):
                    part = [texts[i] for i in indices]
                    for name, embed in paths.items():
                        vectors[name][indices], elapsed = timed(embed, part)
                        seconds[name] += elapsed
                    started = time.perf_counter()
                    vectors["served"][indices] = await embed_through_service(inference, part, concurrency=4)
                    seconds["served"] += time.perf_counter() - started
                    print(f"  round {number}/{args.rounds}: " + ", ".join(f"{name} {seconds[name]:.1f} s" for name in seconds),
                          flush=True)

        asyncio.run(served_rounds())
    load_after = os.getloadavg()
    reference = vectors["reference"]
    reference_s, direct_s, served_s = seconds["reference"], seconds["direct"], seconds["served"]
    direct, served = vectors["direct"], vectors["served"]

    def cosine(vectors: np.ndarray) -> float:
        return float((vectors * reference).sum(axis=1).min())

    rows = [
        (f"sentence-transformers (torch {reference_device})", f"{len(texts) / reference_s:.0f}", "1.00x", "1.000000"),
        ("EmbeddingModel fp32, length-sorted (no service)", f"{len(texts) / direct_s:.0f}",
         f"{reference_s / direct_s:.2f}x", f"{cosine(direct):.6f}"),
        ("inference service Embed, fp32 (served)", f"{len(texts) / served_s:.0f}",
         f"{reference_s / served_s:.2f}x", f"{cosine(served):.6f}"),
    ]
    print_table(f"Embeddings: {len(texts)} texts, {args.threads} threads, {args.rounds} interleaved rounds, load average "
                f"{load_before[0]:.1f} -> {load_after[0]:.1f} (targets: served fp32 >= 1.5x at cosine >= 0.999)",
                ("path", "sentences/s", "vs reference", "min cosine"), rows)
    path = write_results(args.results, {
        "device": args.device, "reference_device": reference_device, "direct_providers": direct_model.providers,
        "texts": len(texts), "threads": args.threads, "rounds": args.rounds,
        "load_average_before": load_before[0], "load_average_after": load_after[0],
        "reference_sentences_per_s": len(texts) / reference_s,
        "direct_sentences_per_s": len(texts) / direct_s,
        "served_sentences_per_s": len(texts) / served_s,
        "served_speedup": reference_s / served_s,
        "served_min_cosine": cosine(served), "direct_min_cosine": cosine(direct),
        "served_variant": "fp32",
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
