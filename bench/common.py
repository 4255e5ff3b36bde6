"""What the benchmarks share: free ports, the environment of a private embedded stack, and how
busy the machine was while they ran."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmos.assertions import service_key_environment
from llmos.settings import SERVICE_NAMES, PlatformSettings
from llmos.stack import free_port

REPO = Path(__file__).resolve().parents[1]


def settings_from(env: dict[str, str]) -> PlatformSettings:
    """The settings a service started with exactly `env` reads (this process's environment left as it was)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return PlatformSettings(_env_file=None)  # type: ignore[call-arg]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def private_environment(home: Path, api_key: str, **variables: str) -> None:
    """A stack of its own under `home` (sharing the built models) on free ports, with `api_key` an admin
    key of tenant `bench`, so a running `llmos up` is no obstacle; `variables` are the bench's own settings."""
    (home / "models").symlink_to((REPO / ".llmos" / "models").resolve(), target_is_directory=True)
    os.environ.update({
        "LLMOS_HOME": str(home),
        "LLMOS_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "LLMOS_NATS_MONITOR_PORT": str(free_port()),
        "LLMOS_API_KEYS": f"{api_key}=bench:bench:admin",
        "LLMOS_GATEWAY_ADDR": f"127.0.0.1:{free_port()}",
        # The bench sends the same prompts more than once: without this, a later run reuses an earlier
        # one's KV cache and its first token comes early, which says nothing about what is measured.
        "LLMOS_INFERENCE_PREFIX_CACHE_MIN_TOKENS": "1000000",
        **service_key_environment(),
        **variables,
    })
    for name in SERVICE_NAMES:
        os.environ[f"LLMOS_{name.upper()}_ADDR"] = f"127.0.0.1:{free_port()}"


# A run or round taken while the machine's load average (or the CPU other processes took) was
# above this is marked noisy: on two shared cores such figures say more about the neighbours.
NOISY_LOAD = 1.0


def _process_tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of `root` and every process below it now running."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name (field 2) may hold spaces: the fields after it start past its ')'.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(pid, 0.0) for pid in tree)


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (every state but idle and iowait) since boot."""
    values = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadWindow:
    """The machine's load over a stretch of a benchmark: the 1-minute load average at its start and
    end, and the cores that processes outside this benchmark (this process and what it started)
    kept busy meanwhile. The load average counts the benchmark's own threads too, and keeps them
    for a minute after a stretch; the other processes' CPU does not."""

    def __init__(self) -> None:
        self.load_before = os.getloadavg()[0]
        self._started = time.monotonic()
        self._busy = _busy_cpu_s()
        self._own = _process_tree_cpu_s(os.getpid())

    def close(self) -> dict[str, float | bool]:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        others = max(0.0, (_busy_cpu_s() - self._busy) - (_process_tree_cpu_s(os.getpid()) - self._own)) / elapsed
        load_after = os.getloadavg()[0]
        return {"load_average_1m_before": self.load_before, "load_average_1m_after": load_after,
                "other_processes_cores": others, "noisy": noisy(self.load_before, others)}


def noisy(load_before: float, other_processes_cores: float) -> bool:
    """Whether the machine was busy with other work: a 1-minute load average above NOISY_LOAD when
    the stretch began, or other processes using more than NOISY_LOAD cores on average during it."""
    return load_before > NOISY_LOAD or other_processes_cores > NOISY_LOAD


def spread(values: Sequence[float]) -> dict[str, float]:
    """How a figure varied over repeated rounds: min, p5, median, p95, max."""
    if not values:
        return {}
    low, p5, median, p95, high = (float(q) for q in np.percentile(np.asarray(values, dtype=float), [0, 5, 50, 95, 100]))
    return {"min": low, "p5": p5, "median": median, "p95": p95, "max": high, "rounds": len(values)}
