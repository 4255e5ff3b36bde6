"""A real NATS cluster on loopback: three `nats-server` processes joined by routes, JetStream on
each with its own store, for replication and fault tests.

Each node is started from the same config `llmos up` writes (llmos.stack.nats_command: payload
limit, JetStream store, optional users), with a `server_name` and a `cluster` block added. Nodes
can be killed (SIGKILL, a crash) and started again on the same ports and store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos.stack import nats_command, port_open
from tests.conftest import free_port

CLUSTER_NAME = "llmos-test"
START_TIMEOUT_S = 20.0


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

    def monitor(self, endpoint: str) -> dict[str, Any]:
        """A JSON page of this node's monitoring server (`jsz`, `routez`, `healthz`, …)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{endpoint}", timeout=2) as response:
            return dict(json.loads(response.read()))


@dataclass
class NatsCluster:
    nodes: list[ClusterNode]
    authorization: str = ""
    _routes: list[str] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        """Every node's client URL. A client given one learns the others from the server (the
        cluster's connect_urls) and reconnects to them when its node goes."""
        return [node.url for node in self.nodes]

    def start(self, node: ClusterNode) -> None:
        """Start `node` (again): same ports, same store."""
        command = nats_command(node.folder / "jetstream", "127.0.0.1", node.port, node.monitor_port, self.authorization)
        config = node.folder / "nats-server.conf"
        routes = ", ".join(json.dumps(route) for route in self._routes)
        with config.open("a") as handle:
            handle.write(
                f"server_name: {json.dumps(node.name)}\n"
                f"cluster {{\n  name: {json.dumps(CLUSTER_NAME)}\n  listen: \"127.0.0.1:{node.route_port}\"\n"
                f"  routes: [{routes}]\n}}\n"
            )
        log = (node.folder / "nats.log").open("ab")
        node.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()

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

    def wait_ready(self, nodes: list[ClusterNode] | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until each node accepts clients, sees the others and JetStream has a meta leader."""
        waiting = nodes or self.nodes
        deadline = time.monotonic() + timeout_s
        for node in waiting:
            while not self._ready(node):
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"nats-server {node.name} exited; see {node.folder / 'nats.log'}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats-server {node.name} not clustered after {timeout_s} s; see {node.folder / 'nats.log'}")
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


@contextmanager
def nats_cluster(folder: Path, size: int = 3, authorization: str = "") -> Iterator[NatsCluster]:
    """`size` nats-servers clustered on loopback, each with its own store under `folder`;
    stopped (SIGTERM, then SIGKILL) on exit."""
    nodes = [
        ClusterNode(f"n{index + 1}", free_port(), free_port(), free_port(), folder / f"n{index + 1}")
        for index in range(size)
    ]
    cluster = NatsCluster(nodes, authorization, [f"nats-route://127.0.0.1:{node.route_port}" for node in nodes])
    for node in nodes:
        node.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(node.folder, 0o700)
    try:
        for node in nodes:
            cluster.start(node)
        cluster.wait_ready()
        yield cluster
    finally:
        for node in nodes:
            cluster.stop(node)
