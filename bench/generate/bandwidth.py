"""The physical limit of one decode stream: a token reads every weight once, so tokens/s cannot
exceed what the cores read from memory per second divided by the weights' bytes (issue 15, item 1:
2 cores read about 36-40 GB/s here and the int4 weights are 86 MB, so about 420-460 tokens/s).

Read bandwidth is measured as `threads` threads each summing its own part of an array far larger
than the caches, as 64-bit integers (NumPy's fastest reduction here; reductions release the GIL);
the best of several passes is kept, as the decoder's weights are read the same way, from memory,
every step."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ARRAY_BYTES = 1 << 30  # 1 GiB: well past any last-level cache
PASSES = 5


def read_bandwidth_gb_s(threads: int, array_bytes: int = ARRAY_BYTES, passes: int = PASSES) -> float:
    """The best of `passes` whole reads of `array_bytes` by `threads` threads, in GB/s (10^9 bytes)."""
    data = np.ones(array_bytes // 8, dtype=np.int64)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(np.sum, parts))  # pages touched, threads started
        for _ in range(passes):
            started = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - started)
    return data.nbytes / best / 1e9


def weights_bytes(folder: Path) -> int:
    """Bytes of the served graph and its weights (`model.onnx`, `model.onnx.data`)."""
    return sum(path.stat().st_size for path in folder.glob("model.onnx*"))


def decode_limit(bandwidth_gb_s: float, weights: int, single_decode_tps: float) -> dict[str, float]:
    """The bandwidth-bound tokens/s of one stream and the fraction of it a measured rate reaches."""
    limit = bandwidth_gb_s * 1e9 / weights
    return {"read_bandwidth_gb_s": bandwidth_gb_s, "weights_mb": weights / 1e6, "limit_tps": limit,
            "single_decode_fraction_of_limit": single_decode_tps / limit}
