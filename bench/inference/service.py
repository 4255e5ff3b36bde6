"""A nats-server and the inference service as real processes, for benchmarks through gRPC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import free_port, settings_from
from llmos.settings import SERVICE_NAMES
from llmos.stack import nats_command, port_open, stop_pids, wait_until_serving

REPO = Path(__file__).resolve().parents[2]
BENCH_KEY = "bench-key"
METADATA = (("authorization", f"Bearer {BENCH_KEY}"),)


@contextmanager
def inference_service(models_home: Path, overrides: dict[str, str]) -> Iterator[str]:
    """Yields the address of a running inference service using the models under `models_home`."""
    with tempfile.TemporaryDirectory(prefix="llmos-bench-") as folder:
        home = Path(folder)
        (home / "models").symlink_to(models_home.resolve() / "models", target_is_directory=True)
        (home / "logs").mkdir()
        port, monitor = free_port(), free_port()
        nats = subprocess.Popen(nats_command(home / "jetstream", "127.0.0.1", port, monitor),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not port_open("127.0.0.1", port):
            time.sleep(0.05)
        env = {key: value for key, value in os.environ.items() if not key.startswith("LLMOS_")}
        env.update({f"LLMOS_{name.upper()}_ADDR": f"127.0.0.1:{free_port()}" for name in SERVICE_NAMES})
        env.update({
            "LLMOS_HOME": str(home), "LLMOS_NATS_URL": f"nats://127.0.0.1:{port}", "LLMOS_LOG_LEVEL": "WARNING",
            "LLMOS_API_KEYS": f"{BENCH_KEY}=bench:bench:admin",
            "PYTHONPATH": str(REPO), **overrides,
        })
        settings = settings_from(env)
        with (home / "logs" / "inference.log").open("wb") as log:
            service = subprocess.Popen([sys.executable, "-m", "services.inference"], cwd=home, env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_serving(settings, {"inference": service}, timeout_s=120)
            yield settings.inference_addr
        finally:
            stop_pids([service.pid, nats.pid], timeout_s=15)


def write_results(area: str, results: dict[str, object]) -> Path:
    path = REPO / "bench" / "results" / f"{area}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path


def print_table(title: str, header: tuple[str, ...], rows: list[tuple[object, ...]]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
