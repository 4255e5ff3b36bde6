"""llmos.cluster.ClusterStack.start_all (issue 16, item 2): a replica that exits while starting
(a start-up request timed out while the cluster settled) is started again, a bounded number of
times, and one that keeps exiting fails the start with its log.

The replicas are small processes serving gRPC health on their ports (no models, no NATS)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llmos.cluster import START_TRIES, ClusterStack, NatsCluster, Replica, ReplicaExited, new_nats_cluster
from llmos.stack import _spawn

pytestmark = pytest.mark.unit

HEALTH_SERVER = """
import sys, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)  # "" is SERVING
server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
server.start()
time.sleep(60)
"""


class FlakyStarts(ClusterStack):
    """Replicas whose first `failures[name]` starts exit at once; later starts serve health."""

    def __init__(self, nats: NatsCluster, failures: dict[str, int]) -> None:
        super().__init__(nats, {}, {})
        self.failures = failures
        self.starts: list[str] = []

    def start(self, replica: Replica) -> None:
        self.starts.append(replica.name)
        failing = self.starts.count(replica.name) <= self.failures.get(replica.name, 0)
        script = "raise SystemExit(1)" if failing else HEALTH_SERVER
        replica.process = _spawn([sys.executable, "-c", script, str(replica.port)], replica.log, {"PATH": ""})


def stack_of(tmp_path: Path, failures: dict[str, int]) -> FlakyStarts:
    stack = FlakyStarts(new_nats_cluster(tmp_path / "nats", 1), failures)
    (tmp_path / "models").mkdir()
    stack.plan(tmp_path, tmp_path / "models", {"tokenizer": 2})
    return stack


def test_a_replica_that_exits_while_starting_is_started_again(tmp_path: Path) -> None:
    stack = stack_of(tmp_path, {"tokenizer-2": START_TRIES - 1})
    records: list[int] = []
    try:
        stack.start_all(lambda: records.append(len(stack.starts)))
        assert stack.starts.count("tokenizer-2") == START_TRIES and stack.starts.count("tokenizer-1") == 1
        assert len(records) == len(stack.starts)  # every spawn recorded, restarts included
        assert all(replica.process is not None and replica.process.poll() is None for replica in stack.replicas)
    finally:
        stack.stop()


def test_a_replica_that_keeps_exiting_fails_the_start(tmp_path: Path) -> None:
    stack = stack_of(tmp_path, {"tokenizer-1": START_TRIES})
    try:
        with pytest.raises(ReplicaExited, match="tokenizer-1 exited"):
            stack.start_all()
        assert stack.starts.count("tokenizer-1") == START_TRIES
    finally:
        stack.stop()


def test_every_replica_writes_its_spans_to_the_one_telemetry_folder(tmp_path: Path) -> None:
    """`llmos trace` reads one span file: the replicas' homes share the platform's telemetry folder."""
    stack = FlakyStarts(new_nats_cluster(tmp_path / "nats", 1), {})
    (tmp_path / "models").mkdir()
    platform_telemetry = tmp_path / "home" / "telemetry"
    stack.plan(tmp_path / "cluster", tmp_path / "models", {"tokenizer": 2, "ingest": 1}, telemetry_dir=platform_telemetry)
    homes = [replica.home for replica in stack.replicas]
    assert len(homes) == 3 and platform_telemetry.is_dir()
    assert {(home / "telemetry").resolve() for home in homes} == {platform_telemetry.resolve()}
