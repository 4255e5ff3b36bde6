"""The platform as a cluster on one machine (`llmos up --cluster`, issue 16, item 2): three
nats-servers clustered on loopback with every stream and bucket at three replicas, and two
replicas of each stateless service, each a process with its own port, metrics port and LLMOS_HOME.

- NATS: each node is started from the same config `llmos up` writes (llmos.stack.nats_command:
  payload limit, JetStream store, users, the JetStream key), with a `server_name` and a `cluster`
  block added. A node can be killed (SIGKILL, a crash) and started again on its ports and store.
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

Under `llmos up --cluster` the cluster lives in `$LLMOS_HOME/cluster` (the nodes' stores in
`nats/n1..n3`, each replica's home in `homes/<service>-<n>`, its log in that home's `logs/`,
its spans in the platform's `telemetry/spans.jsonl` with every other process's);
the first node and each service's first replica take the configured addresses (LLMOS_NATS_URL,
LLMOS_<SERVICE>_ADDR), so a client configured for one machine reaches the cluster too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
from nats.errors import TimeoutError as NatsTimeoutError

from llmos.bus.broker import declare_streams
from llmos.grpcutil.health_probe import check
from llmos.grpcutil.tls import caller_credentials
from llmos.natsauth import (
    ADMIN_USER,
    authorization_block,
    credentials_path,
    new_credentials,
    read_publishers,
    write_credentials,
)
from llmos.secrets import development_warning, refuse_published_values
from llmos.settings import GATEWAY, SERVICE_NAMES, PlatformSettings, private_home
from llmos.stack import (
    StackProcess,
    _spawn,
    free_port,
    nats_command,
    nats_port,
    port_open,
    stop_pids,
    stop_stack,
    tail,
    wait_until_answering,
    warn_unencrypted_store,
    write_stack,
)

CLUSTER_NAME = "llmos"
CLUSTER_FOLDER = "cluster"
NODES = 3
NODE_START_TIMEOUT_S = 20.0
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
# Starts of a replica before `llmos up --cluster` gives up: one whose start-up JetStream request
# times out on a loaded machine (the cluster still settling) exits, and starts fine again.
START_TRIES = 3


class ReplicaExited(RuntimeError):
    """A replica's process exited while it was awaited."""


@dataclass
class ClusterNode:
    name: str
    port: int
    route_port: int
    monitor_port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.folder / "nats-server.conf"  # where nats_command writes it, beside the store

    @property
    def log(self) -> Path:
        return self.folder / "nats.log"

    def monitor(self, endpoint: str) -> dict[str, Any]:
        """A JSON page of this node's monitoring server (`jsz`, `routez`, `healthz`, …)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{endpoint}", timeout=2) as response:
            return dict(json.loads(response.read()))


@dataclass
class NatsCluster:
    nodes: list[ClusterNode]
    authorization: str = ""
    _routes: list[str] = field(default_factory=list)
    name: str = CLUSTER_NAME
    jetstream_key: str = ""

    @property
    def urls(self) -> list[str]:
        """Every node's client URL. A client given one learns the others from the server (the
        cluster's connect_urls) and reconnects to them when its node goes."""
        return [node.url for node in self.nodes]

    def start(self, node: ClusterNode) -> None:
        """Start `node` (again): same ports, same store."""
        command = nats_command(
            node.folder / "jetstream", "127.0.0.1", node.port, node.monitor_port, self.authorization, self.jetstream_key
        )
        routes = ", ".join(json.dumps(route) for route in self._routes)
        with node.config.open("a") as handle:
            handle.write(
                f"server_name: {json.dumps(node.name)}\n"
                f"cluster {{\n  name: {json.dumps(self.name)}\n  listen: \"127.0.0.1:{node.route_port}\"\n"
                f"  routes: [{routes}]\n}}\n"
            )
        node.process = _spawn(command, node.log, os.environ)

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL: the node stops as in a crash, nothing flushed, no goodbye to its routes."""
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(timeout=10)

    def stop(self, node: ClusterNode) -> None:
        if node.process is not None and node.process.poll() is None:
            node.process.terminate()
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill(node)

    def start_all(self) -> None:
        """Every node started, then clustered (wait_ready); all stopped when one fails to."""
        try:
            for node in self.nodes:
                self.start(node)
            self.wait_ready()
        except BaseException:
            self.stop_all()
            raise

    def stop_all(self) -> None:
        for node in self.nodes:
            self.stop(node)

    def wait_ready(self, nodes: list[ClusterNode] | None = None, timeout_s: float = NODE_START_TIMEOUT_S) -> None:
        """Until each node accepts clients, sees the others and JetStream has a meta leader."""
        waiting = nodes or self.nodes
        deadline = time.monotonic() + timeout_s
        for node in waiting:
            while not self._ready(node):
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"nats-server {node.name} exited; see {node.log}:\n{tail(node.log)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats-server {node.name} not clustered after {timeout_s} s; see {node.log}")
                time.sleep(0.1)

    def _ready(self, node: ClusterNode) -> bool:
        if not port_open("127.0.0.1", node.port):
            return False
        try:
            jsz = node.monitor("jsz")
            routes = node.monitor("routez")
        except OSError:
            return False
        # A node that has seen the others has a route to each (two per peer with pooling).
        peers = {route.get("remote_name") for route in routes.get("routes", [])}
        running = [other for other in self.nodes if other.process is not None and other.process.poll() is None]
        return bool(jsz.get("meta_cluster", {}).get("leader")) and len(peers - {None}) >= len(running) - 1


def new_nats_cluster(
    folder: Path,
    size: int = NODES,
    authorization: str = "",
    *,
    name: str = CLUSTER_NAME,
    jetstream_key: str = "",
    first_ports: tuple[int, int] | None = None,
) -> NatsCluster:
    """`size` nodes (not started), each with its own store under `folder/n<i>` (0700) and free
    ports; `first_ports` (client, monitoring) for the first node instead."""
    nodes = []
    for index in range(size):
        port, monitor_port = first_ports if first_ports and index == 0 else (free_port(), free_port())
        nodes.append(ClusterNode(f"n{index + 1}", port, free_port(), monitor_port, folder / f"n{index + 1}"))
    for node in nodes:
        node.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(node.folder, 0o700)
    routes = [f"nats-route://127.0.0.1:{node.route_port}" for node in nodes]
    return NatsCluster(nodes, authorization, routes, name, jetstream_key)


@contextmanager
def nats_cluster(folder: Path, size: int = NODES, authorization: str = "") -> Iterator[NatsCluster]:
    """`size` nats-servers clustered on loopback, each with its own store under `folder`;
    stopped (SIGTERM, then SIGKILL) on exit."""
    cluster = new_nats_cluster(folder, size, authorization)
    cluster.start_all()
    try:
        yield cluster
    finally:
        cluster.stop_all()


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
    # Where replicas run: None, each in its own home (so no `.env` is read: `env` is all they
    # get); `llmos up --cluster` runs them where it was started, as `llmos up` does.
    workdir: Path | None = None
    # What the health probes present under TLS (llmos.grpcutil.tls.caller_credentials).
    channel_credentials: grpc.ChannelCredentials | None = None

    def of(self, service: str) -> list[Replica]:
        return [replica for replica in self.replicas if replica.service == service]

    def addr(self, service: str) -> str:
        """The address setting clients get: every replica of `service`."""
        return self.env[f"LLMOS_{service.upper()}_ADDR"]

    def plan(
        self,
        folder: Path,
        models_dir: Path,
        replicas: Mapping[str, int] = REPLICAS,
        ports: Mapping[str, Sequence[tuple[int, int]]] | None = None,
        telemetry_dir: Path | None = None,
    ) -> None:
        """Add `replicas[service]` replicas of each service, their homes under `folder/homes`
        with `models_dir` linked in, and set every LLMOS_<SERVICE>_ADDR to the list of its
        replicas. `ports[service]` gives (port, metrics port) of its first replicas; the rest
        take free ports, as does the address of a service with no replica. `telemetry_dir`
        (default `folder/telemetry`) is every home's telemetry folder: the replicas append to one
        span file, so `llmos trace` follows a call across replicas."""
        shared_telemetry = telemetry_dir or folder / "telemetry"
        shared_telemetry.mkdir(parents=True, exist_ok=True)
        for service in SERVICE_NAMES:
            wanted = (ports or {}).get(service, ())
            for index in range(replicas.get(service, 0)):
                home = folder / "homes" / f"{service}-{index + 1}"
                home.mkdir(parents=True, exist_ok=True)
                for name, target in (("models", models_dir), ("telemetry", shared_telemetry)):
                    if not (home / name).is_symlink():
                        (home / name).symlink_to(target, target_is_directory=True)
                port, metrics_port = wanted[index] if index < len(wanted) else (free_port(), free_port())
                seed = self.nats.urls[len(self.replicas) % len(self.nats.urls)]
                self.replicas.append(Replica(service, index + 1, port, metrics_port, home, seed))
        for service in SERVICE_NAMES:
            addrs = [replica.addr for replica in self.of(service)] or [f"127.0.0.1:{free_port()}"]
            self.env[f"LLMOS_{service.upper()}_ADDR"] = ",".join(addrs)

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
        replica.process = _spawn(
            [sys.executable, "-m", f"services.{replica.service}"], replica.log, self.replica_env(replica),
            cwd=self.workdir or replica.home,
        )

    def start_all(self, started: Callable[[], None] = lambda: None) -> None:
        """Every replica, one service at a time, each SERVING before the next starts: a dozen
        processes loading models at once on a small machine starve nats-server. A replica that
        exits while starting is started again, START_TRIES times in all. `started` runs after
        each spawn (to record it)."""
        for service in SERVICE_NAMES:
            replicas = self.of(service)
            if not replicas:
                continue
            for replica in replicas:
                self.start(replica)
                started()
            for attempt in range(1, START_TRIES + 1):
                try:
                    self.wait_serving(replicas)
                    break
                except ReplicaExited as exc:
                    if attempt == START_TRIES:
                        raise
                    print(f"{exc}\nstarting it again (try {attempt + 1} of {START_TRIES})", file=sys.stderr)
                    for replica in replicas:
                        if replica.process is not None and replica.process.poll() is not None:
                            self.start(replica)
                            started()

    def wait_serving(self, replicas: list[Replica] | None = None, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until each replica's own port answers SERVING; one that exits fails at once."""
        waiting = list(replicas or self.replicas)
        deadline = time.monotonic() + timeout_s
        while waiting:
            for replica in list(waiting):
                assert replica.process is not None
                if replica.process.poll() is not None:
                    raise ReplicaExited(f"{replica.name} exited ({replica.process.returncode}):\n{tail(replica.log)}")
                if check(replica.addr, timeout_s=0.5, credentials=self.channel_credentials) == "SERVING":
                    waiting.remove(replica)
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"not SERVING after {timeout_s:.0f} s: {[replica.name for replica in waiting]}")
            time.sleep(0.3)

    def stop(self) -> None:
        stop_pids([replica.process.pid for replica in self.replicas if replica.process is not None], timeout_s=15)

    def admin_connect_options(self) -> dict[str, str]:
        return {"user": ADMIN_USER, "password": self.credentials[ADMIN_USER]}


async def declare_replicated(cluster: NatsCluster, credentials: Mapping[str, str], replicas: int = JETSTREAM_REPLICAS) -> None:
    """Streams and buckets at `replicas` replicas, as the admin (`llmos up` / `llmos streams`)."""
    connection = await nats.connect(cluster.urls, user=ADMIN_USER, password=credentials[ADMIN_USER])
    try:
        # A cluster just formed may leave the first JetStream requests unanswered while it
        # settles (seconds on a loaded machine): a bounded number of tries.
        for attempt in range(DECLARE_TRIES):
            try:
                await declare_streams(connection.jetstream(timeout=10), update=True, replicas=replicas)
                return
            except NatsTimeoutError:
                if attempt == DECLARE_TRIES - 1:
                    raise
                await asyncio.sleep(1.0)
    finally:
        await connection.close()


@contextmanager
def cluster_stack(
    folder: Path,
    models_dir: Path,
    base_env: Callable[[NatsCluster], dict[str, str]],
    replicas: Mapping[str, int] = REPLICAS,
) -> Iterator[ClusterStack]:
    """The cluster under `folder` (free ports, fresh NATS users), every replica SERVING;
    stopped on exit. `base_env` gives what every process shares, from the running cluster."""
    credentials = new_credentials()
    with nats_cluster(folder / "nats", NODES, authorization_block(credentials)) as cluster:
        asyncio.run(declare_replicated(cluster, credentials))
        stack = ClusterStack(cluster, credentials, base_env(cluster))
        stack.plan(folder, models_dir, replicas)
        try:
            stack.start_all()
            yield stack
        finally:
            stack.stop()


def _ports_of(addr: str, metrics_addr: str) -> list[tuple[int, int]]:
    """(port, metrics port) of the replicas a service's settings name: each address listed, the
    first with the configured metrics port (a free one when none is configured)."""
    ports = [int(entry.rpartition(":")[2]) for entry in addr.split(",")]
    metrics = [int(metrics_addr.rpartition(":")[2])] if metrics_addr else []
    return [(port, metrics[index] if index < len(metrics) else free_port()) for index, port in enumerate(ports)]


class PlatformCluster:
    """`llmos up --cluster`: the cluster under `$LLMOS_HOME/cluster` on the configured addresses,
    one gateway, recorded in `run/stack.json` for `llmos down` and `llmos status`."""

    def __init__(self, settings: PlatformSettings, replicas: Mapping[str, int] = REPLICAS) -> None:
        self.settings = settings
        self.replicas = replicas
        self.folder = settings.home / CLUSTER_FOLDER
        self.stack: ClusterStack | None = None
        self.gateway: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the nodes, declare streams at three replicas, start every replica and the
        gateway; returns seconds until all answered. Anything started is stopped on failure."""
        started = time.monotonic()
        settings = self.settings
        refuse_published_values(settings)
        warning = development_warning(settings)
        if warning:
            print(warning, file=sys.stderr)
        private_home(settings.home)
        ports = {
            service: _ports_of(settings.service_addr(service), str(getattr(settings, f"{service}_metrics_addr")))
            for service in SERVICE_NAMES
        }
        nats_ports = (nats_port(settings.nats_url), settings.nats_monitor_port)
        gateway_port = int(settings.gateway_addr.rpartition(":")[2])
        busy = [port for port in (*nats_ports, gateway_port, *(port for pairs in ports.values() for port, _ in pairs))
                if port_open("127.0.0.1", port)]
        if busy:
            raise RuntimeError(f"port(s) {', '.join(map(str, busy))} in use: another `llmos up` is running (try `llmos down`)")
        warn_unencrypted_store(settings, self.folder / "nats")
        credentials = new_credentials()
        write_credentials(credentials_path(settings.home), credentials)
        cluster = new_nats_cluster(
            self.folder / "nats", NODES, authorization_block(credentials, read_publishers(settings.home)),
            jetstream_key=settings.jetstream_key, first_ports=nats_ports,
        )
        env = {**os.environ, "LLMOS_JETSTREAM_REPLICAS": str(JETSTREAM_REPLICAS)}
        self.stack = ClusterStack(
            cluster, credentials, env, workdir=Path.cwd(), channel_credentials=caller_credentials(settings)
        )
        try:
            cluster.start_all()
            self._record()
            asyncio.run(declare_replicated(cluster, credentials))
            self.stack.plan(self.folder, settings.models_dir.resolve(), self.replicas, ports, settings.telemetry_dir.resolve())
            self.stack.start_all(self._record)
            self.gateway = _spawn(
                [sys.executable, "-m", f"services.{GATEWAY}"], settings.logs_dir / f"{GATEWAY}.log", self._gateway_env()
            )
            self._record()
            wait_until_answering(settings, self.gateway, READY_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - started

    def _gateway_env(self) -> dict[str, str]:
        assert self.stack is not None
        return {
            **self.stack.env,
            "LLMOS_HOME": str(self.settings.home.resolve()),
            "LLMOS_NATS_URL": self.stack.nats.urls[0],
            "LLMOS_NATS_USER": GATEWAY,
            "LLMOS_NATS_PASSWORD": self.stack.credentials[GATEWAY],
        }

    def processes(self) -> list[StackProcess]:
        """What runs, as recorded: the nodes (with their configs, for a reload of the users), each
        replica with its address, the gateway."""
        assert self.stack is not None
        recorded = [
            StackProcess(f"nats-{node.name}", node.process.pid, str(node.log), "nats", node.url, str(node.config))
            for node in self.stack.nats.nodes if node.process is not None
        ]
        recorded += [
            StackProcess(replica.name, replica.process.pid, str(replica.log), replica.service, replica.addr)
            for replica in self.stack.replicas if replica.process is not None
        ]
        if self.gateway is not None:
            recorded.append(StackProcess(
                GATEWAY, self.gateway.pid, str(self.settings.logs_dir / f"{GATEWAY}.log"), GATEWAY, self.settings.gateway_addr
            ))
        return recorded

    def _record(self) -> None:
        write_stack(self.settings, self.processes())

    def exited(self) -> list[str]:
        """The processes that are no longer running, by name."""
        assert self.stack is not None
        running: list[tuple[str, subprocess.Popen[bytes] | None]] = [
            *((f"nats-{node.name}", node.process) for node in self.stack.nats.nodes),
            *((replica.name, replica.process) for replica in self.stack.replicas),
            (GATEWAY, self.gateway),
        ]
        return [name for name, process in running if process is not None and process.poll() is not None]

    def stop(self) -> None:
        stop_stack(self.settings)
