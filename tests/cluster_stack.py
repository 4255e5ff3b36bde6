"""The platform as a cluster on one machine for tests (issue 16, item 2): llmos.cluster's layout
(`llmos up --cluster`: three clustered nats-servers, streams and buckets at three replicas, two
replicas of each stateless service, one audit, one retrieval; its docstring says why) under a
test folder, on free ports, with the test keys of tests.conftest and no `.env`.

To try it without touching LLMOS_HOME: `.venv/bin/python -m tests.cluster_stack` (models built
under .llmos, as for `llmos up`) prints every address and runs until Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from llmos import cluster
from llmos.cluster import JETSTREAM_REPLICAS, REPLICAS, ClusterStack, NatsCluster, Replica
from llmos.settings import SERVICE_NAMES
from tests.conftest import REPO, NatsServer, platform_environment

__all__ = ["REPLICAS", "ClusterStack", "Replica", "cluster_stack"]


@contextmanager
def cluster_stack(
    folder: Path, models_home: Path, replicas: Mapping[str, int] = REPLICAS, base_env: Mapping[str, str] | None = None
) -> Iterator[ClusterStack]:
    """The cluster under `folder`, every replica SERVING; stopped on exit. `base_env`: what every
    process shares (default: tests.conftest's platform environment at three replicas)."""

    def shared(nats: NatsCluster) -> dict[str, str]:
        return dict(base_env) if base_env is not None else _base_env(nats, folder)

    with cluster.cluster_stack(folder, models_home / "models", shared, replicas) as stack:
        yield stack


def _base_env(nats: NatsCluster, folder: Path) -> dict[str, str]:
    seed = nats.nodes[0]
    env = platform_environment(NatsServer(seed.url, seed.monitor_port, seed.folder), folder)
    env["LLMOS_JETSTREAM_REPLICAS"] = str(JETSTREAM_REPLICAS)
    env["PYTHONPATH"] = str(REPO)
    return env


def main() -> None:
    # SIGTERM (a supervisor, `kill`) stops it as Ctrl-C does: every process stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    folder = Path(tempfile.mkdtemp(prefix="llmos-cluster-"))
    models_home = Path(os.environ.get("LLMOS_TEST_MODELS_HOME", REPO / ".llmos")).resolve()
    with cluster_stack(folder, models_home) as stack:
        print("NATS:", ",".join(stack.nats.urls))
        for service in SERVICE_NAMES:
            print(f"LLMOS_{service.upper()}_ADDR={stack.addr(service)}")
        print(f"LLMOS_API_KEYS={stack.env['LLMOS_API_KEYS']}")
        print(f"state and logs under {folder}; Ctrl-C stops it")
        try:
            while all(replica.process is not None and replica.process.poll() is None for replica in stack.replicas):
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
