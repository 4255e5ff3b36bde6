"""The platform as a cluster on one machine (issue 16, item 2): three nats-servers clustered on
loopback (tests.cluster_helpers) with every stream and bucket at three replicas, and two replicas
of each stateless service, each a process with its own port, metrics port and LLMOS_HOME.

- Clients reach the replicas through gRPC's own load balancing: every process is given
  LLMOS_<SERVICE>_ADDR listing all of a service's replicas (`127.0.0.1:A,127.0.0.1:B`), which
  llmos.grpcutil.client dials as one `ipv4:` target with `round_robin` and a retry policy for
  idempotent calls; a replica binds its own port (LLMOS_LISTEN_PORT).
- Bus consumers: the durable names are per service, not per replica (llmos.bus.subjects
  .durable_name), so the two replicas of a service pull from one durable consumer: a queue group.
- Audit runs once: its chain is one SQLite file, and two writers would fork it.
- Retrieval runs once: with the embedded index each replica holds its own index under its home
  and, to fill it, its own durable consumers (LLMOS_RETRIEVAL_REPLICA), so two replicas would
  index every chunk twice and could answer differently while one catches up (and the NATS
  grants name one embedded replica, llmos.natsauth.EMBEDDED_RETRIEVAL_REPLICAS). Retrieval
  scales with a Qdrant server (LLMOS_QDRANT_URL), where replicas share one index and one
  consumer: the service that needs the Qdrant server to scale.
- Each replica's NATS seed is a different node: a client learns the others from the cluster and
  reconnects to them when its node goes.

To try it: `.venv/bin/python -m tests.cluster_stack` (models built under .llmos, as for `llmos up`)
prints every address and runs until Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.errors import TimeoutError as NatsTimeoutError

from llmos.bus.broker import declare_streams
from llmos.grpcutil.health_probe import check
from llmos.natsauth import ADMIN_USER, authorization_block, new_credentials
from llmos.settings import SERVICE_NAMES
from llmos.stack import stop_pids, tail
from tests.cluster_helpers import NatsCluster, nats_cluster
from tests.conftest import REPO, NatsServer, free_port, platform_environment

JETSTREAM_REPLICAS = 3
# Processes of each service: two of each stateless one; one audit (one SQLite chain) and one
# retrieval (embedded index: each replica would be an index of its own).
REPLICAS: dict[str, int] = {
    "tokenizer": 2,
    "inference": 2,
    "dialogue": 2,
    "ingest": 2,
    "speech": 2,
    "audit": 1,
    "retrieval": 1,
}
READY_TIMEOUT_S = 240.0
DECLARE_TRIES = 5


@dataclass
class Replica:
    service: str
    index: int
    port: int
    metrics_port: int
    home: Path
    nats_url: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / "logs" / f"{self.name}.log"


@dataclass
class ClusterStack:
    nats: NatsCluster
    credentials: dict[str, str]
    env: dict[str, str]  # what every process shares: the lists of replicas, keys, replication
    replicas: list[Replica] = field(default_factory=list)

    def of(self, service: str) -> list[Replica]:
        return [replica for replica in self.replicas if replica.service == service]

    def addr(self, service: str) -> str:
        """The address setting clients get: every replica of `service`."""
        return self.env[f"LLMOS_{service.upper()}_ADDR"]

    def replica_env(self, replica: Replica) -> dict[str, str]:
        return {
            **self.env,
            "LLMOS_HOME": str(replica.home),
            "LLMOS_LISTEN_PORT": str(replica.port),
            f"LLMOS_{replica.service.upper()}_METRICS_ADDR": f"127.0.0.1:{replica.metrics_port}",
            "LLMOS_NATS_URL": replica.nats_url,
            "LLMOS_NATS_USER": replica.service,
            "LLMOS_NATS_PASSWORD": self.credentials[replica.service],
        }

    def start(self, replica: Replica) -> None:
        """Start `replica` (again): same port, same home."""
        replica.log.parent.mkdir(parents=True, exist_ok=True)
        with replica.log.open("ab") as log:
            replica.process = subprocess.Popen(
                [sys.executable, "-m", f"services.{replica.service}"],
                cwd=replica.home, env=self.replica_env(replica), stdout=log, stderr=subprocess.STDOUT,
            )

    def wait_serving(self, replicas: list[Replica] | None = None, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until each replica's own port answers SERVING; one that exits fails at once."""
        waiting = list(replicas or self.replicas)
        deadline = time.monotonic() + timeout_s
        while waiting:
            for replica in list(waiting):
                assert replica.process is not None
                if replica.process.poll() is not None:
                    raise RuntimeError(f"{replica.name} exited ({replica.process.returncode}):\n{tail(replica.log)}")
                if check(replica.addr, timeout_s=0.5) == "SERVING":
                    waiting.remove(replica)
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"not SERVING after {timeout_s:.0f} s: {[replica.name for replica in waiting]}")
            time.sleep(0.3)

    def stop(self) -> None:
        stop_pids([replica.process.pid for replica in self.replicas if replica.process is not None], timeout_s=15)

    def admin_connect_options(self) -> dict[str, str]:
        return {"user": ADMIN_USER, "password": self.credentials[ADMIN_USER]}


async def _declare(cluster: NatsCluster, credentials: Mapping[str, str]) -> None:
    """Streams and buckets at three replicas, as the admin (`llmos up` / `llmos streams`)."""
    connection = await nats.connect(cluster.urls, user=ADMIN_USER, password=credentials[ADMIN_USER])
    try:
        # A cluster just formed may leave the first JetStream requests unanswered while it
        # settles (seconds on a loaded machine): a bounded number of tries.
        for attempt in range(DECLARE_TRIES):
            try:
                await declare_streams(connection.jetstream(timeout=10), update=True, replicas=JETSTREAM_REPLICAS)
                return
            except NatsTimeoutError:
                if attempt == DECLARE_TRIES - 1:
                    raise
                await asyncio.sleep(1.0)
    finally:
        await connection.close()


@contextmanager
def cluster_stack(
    folder: Path, models_home: Path, replicas: Mapping[str, int] = REPLICAS, base_env: Mapping[str, str] | None = None
) -> Iterator[ClusterStack]:
    """The cluster under `folder`, every replica SERVING; stopped on exit."""
    credentials = new_credentials()
    with nats_cluster(folder / "nats", 3, authorization_block(credentials)) as cluster:
        asyncio.run(_declare(cluster, credentials))
        env = dict(base_env) if base_env is not None else _base_env(cluster, folder)
        stack = ClusterStack(cluster, credentials, env)
        for service in SERVICE_NAMES:
            for index in range(replicas.get(service, 0)):
                home = folder / "homes" / f"{service}-{index + 1}"
                home.mkdir(parents=True, exist_ok=True)
                (home / "models").symlink_to(models_home / "models", target_is_directory=True)
                seed = cluster.urls[len(stack.replicas) % len(cluster.urls)]
                stack.replicas.append(Replica(service, index + 1, free_port(), free_port(), home, seed))
        for service in SERVICE_NAMES:
            ports = [replica.addr for replica in stack.of(service)] or [f"127.0.0.1:{free_port()}"]
            env[f"LLMOS_{service.upper()}_ADDR"] = ",".join(ports)
        try:
            # One service at a time: a dozen processes loading models at once on a small machine
            # starve nats-server, and a service whose start-up request times out exits.
            for service in SERVICE_NAMES:
                for replica in stack.of(service):
                    stack.start(replica)
                stack.wait_serving(stack.of(service))
            yield stack
        finally:
            stack.stop()


def _base_env(cluster: NatsCluster, folder: Path) -> dict[str, str]:
    seed = cluster.nodes[0]
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
