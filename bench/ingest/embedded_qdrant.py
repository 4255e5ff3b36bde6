"""Which embedded Qdrant engine the retrieval service uses by default: qdrant-client's local
mode against qdrant-edge-py, through the service's own index classes.

For each size (default 10k and 100k chunks) both engines get the same 384-d vectors, spread
over two tenants; queries run with the mandatory tenant filter. Recall@10 is against exact
top-10 by brute force (numpy) within the tenant; queries/s is single-threaded, one query at a
time, as a Search call issues them. Vectors are synthetic (clustered unit vectors, as sentence
embeddings are): embedding 100k real chunks would take hours on this machine.

    python -m bench.ingest.embedded_qdrant [--sizes 10000 100000] [--queries 200] [--engines ...]

Updates bench/results/ingest-embedded-qdrant.json: the rows measured replace those of the same
engine and size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmos.v1 import common_pb2
from services.retrieval.index import ChunkFilter, ChunkIndex, ClientIndex, EdgeIndex, IndexedChunk, SparseVector

DIMENSIONS = 384
TENANTS = ("bench-a", "bench-b")
RESULTS = Path(__file__).resolve().parents[1] / "results" / "ingest-embedded-qdrant.json"
UPSERT_BATCH = 256


def clustered_vectors(count: int, rng: np.random.Generator, clusters: int = 200) -> np.ndarray:
    centres = rng.normal(size=(clusters, DIMENSIONS)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, count)] + 0.6 * rng.normal(size=(count, DIMENSIONS)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def load(index: ChunkIndex, vectors: np.ndarray, tenants: np.ndarray) -> float:
    """Upsert every vector; returns chunks/s."""
    started = time.perf_counter()
    empty = SparseVector([], [])
    for start in range(0, len(vectors), UPSERT_BATCH):
        batch = []
        for i in range(start, min(start + UPSERT_BATCH, len(vectors))):
            tenant = TENANTS[tenants[i]]
            chunk = common_pb2.Chunk(
                chunk_id=str(uuid.UUID(int=i + 1)), document_id=f"doc-{i}", tenant=tenant, index=0, text=f"chunk {i}"
            )
            batch.append(IndexedChunk(chunk, "h", 0.0, vectors[i].tolist(), empty))
        index.upsert(batch)
    return len(vectors) / (time.perf_counter() - started)


def measure(index: ChunkIndex, vectors: np.ndarray, tenants: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    in_tenant = np.flatnonzero(tenants == 0)
    recalls, elapsed = [], 0.0
    where = ChunkFilter(TENANTS[0])
    for query in queries:
        exact = in_tenant[np.argsort(-(vectors[in_tenant] @ query))[:10]]
        started = time.perf_counter()
        hits = index.dense(query.tolist(), where, 10)
        elapsed += time.perf_counter() - started
        found = {int(uuid.UUID(hit.chunk.chunk_id).int) - 1 for hit in hits}
        recalls.append(len(found & set(exact.tolist())) / 10)
    return {"recall_at_10": float(np.mean(recalls)), "queries_per_s": len(queries) / elapsed}


ENGINES: dict[str, Callable[[Path], ChunkIndex]] = {
    "qdrant-client local": lambda folder: ClientIndex("bench", DIMENSIONS, path=folder),
    "qdrant-edge": lambda folder: EdgeIndex(folder, DIMENSIONS, 256.0),
}


def run(sizes: list[int], query_count: int, seed: int, engines: list[str]) -> list[dict[str, float | int | str]]:
    rng = np.random.default_rng(seed)
    rows: list[dict[str, float | int | str]] = []
    for size in sizes:
        vectors = clustered_vectors(size, rng)
        tenants = rng.integers(0, len(TENANTS), size)
        queries = clustered_vectors(query_count, rng)
        for name in engines:
            with tempfile.TemporaryDirectory() as folder:
                index = ENGINES[name](Path(folder))
                upserts = load(index, vectors, tenants)
                row: dict[str, float | int | str] = {"engine": name, "chunks": size, "upserts_per_s": upserts}
                row.update(measure(index, vectors, tenants, queries))
                index.close()
            rows.append(row)
            print(f"{name:<22} {size:>8,} {row['upserts_per_s']:>12,.0f} {row['recall_at_10']:>10.3f} {row['queries_per_s']:>10,.1f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    args = parser.parse_args(argv)
    print(f"{'engine':<22} {'chunks':>8} {'upserts/s':>12} {'recall@10':>10} {'queries/s':>10}")
    rows = run(args.sizes, args.queries, args.seed, args.engines)
    for row in rows:
        row["queries"] = args.queries
    # Runs of some engines or sizes update their rows and keep the others.
    previous = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    measured = {(row["engine"], row["chunks"]) for row in rows}
    kept = [row for row in previous if (row["engine"], row["chunks"]) not in measured]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "embedded-qdrant", "dimensions": DIMENSIONS, "tenant_filter": True,
                                   "rows": sorted(kept + rows, key=lambda r: (r["chunks"], r["engine"]))}, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
