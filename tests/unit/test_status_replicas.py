"""`llmos status` over replicas (issue 16, item 2): a service's address list, and the replicas a
running `llmos up --cluster` recorded, each probed and shown with its own health.

Real gRPC health servers on loopback stand for the replicas; NATS is not running."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmos.settings import SERVICE_NAMES, PlatformSettings, load_settings
from llmos.stack import StackProcess, write_stack
from llmos_cli.main import main
from llmos_cli.status import nats_urls, replica_addresses, service_health, service_rows

pytestmark = pytest.mark.unit

NOWHERE = "127.0.0.1:1"


@pytest.fixture
def replicas() -> Iterator[list[str]]:
    """Two health servers: the first SERVING, the second NOT_SERVING (a replica still loading)."""
    servers, addresses = [], []
    for status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set("", status)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    yield addresses
    for server in servers:
        server.stop(None)


@pytest.fixture
def stopped_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every service and NATS configured where nothing answers, in a home of its own."""
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    for name in SERVICE_NAMES:
        monkeypatch.setenv(f"LLMOS_{name.upper()}_ADDR", NOWHERE)
    monkeypatch.setenv("LLMOS_NATS_URL", "nats://127.0.0.1:1")
    return tmp_path


def settings() -> PlatformSettings:
    return load_settings(PlatformSettings)


def test_an_address_list_is_each_replica(stopped_platform: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_INFERENCE_ADDR", "127.0.0.1:7001,127.0.0.1:7002")
    addresses = replica_addresses(settings(), [])
    assert addresses["inference"] == ["127.0.0.1:7001", "127.0.0.1:7002"]
    assert addresses["tokenizer"] == [NOWHERE]


def test_the_running_cluster_adds_the_replicas_the_setting_does_not_list(stopped_platform: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_INFERENCE_ADDR", "127.0.0.1:7001")
    running = [
        StackProcess("inference-1", 11, "i1.log", "inference", "127.0.0.1:7001"),
        StackProcess("inference-2", 12, "i2.log", "inference", "127.0.0.1:7002"),
        # Another stack's replicas: the tokenizer setting names none of them, so none is shown.
        StackProcess("tokenizer-1", 13, "t1.log", "tokenizer", "127.0.0.1:7101"),
        StackProcess("nats-n1", 14, "n1.log", "nats", "nats://127.0.0.1:1", "n1.conf"),
        StackProcess("nats-n2", 15, "n2.log", "nats", "nats://127.0.0.1:4300", "n2.conf"),
    ]
    addresses = replica_addresses(settings(), running)
    assert addresses["inference"] == ["127.0.0.1:7001", "127.0.0.1:7002"]
    assert addresses["tokenizer"] == [NOWHERE]
    assert nats_urls(settings(), running) == ["nats://127.0.0.1:1", "nats://127.0.0.1:4300"]
    assert nats_urls(settings(), running[:4]) == ["nats://127.0.0.1:1"]
    # A stack recorded before addresses were (no address): the setting alone.
    assert replica_addresses(settings(), [StackProcess("inference", 11, "i.log")])["inference"] == ["127.0.0.1:7001"]


def test_one_health_per_service_from_its_replicas() -> None:
    assert service_health([{"health": "SERVING"}, {"health": "SERVING"}]) == "SERVING"
    assert service_health([{"health": "SERVING"}, {"health": "NOT_SERVING"}]) == "DEGRADED"
    assert service_health([{"health": "UNREACHABLE (UNAVAILABLE)"}, {"health": "NOT_SERVING"}]) == "UNREACHABLE (UNAVAILABLE)"
    rows = service_rows([
        {"name": "inference", "replicas": [{"address": "a:1", "health": "SERVING"}, {"address": "a:2", "health": "NOT_SERVING"}]},
        {"name": "audit", "replicas": [{"address": "a:3", "health": "SERVING"}]},
    ])
    assert rows == [["inference", "a:1", "SERVING"], ["", "a:2", "NOT_SERVING"], ["audit", "a:3", "SERVING"]]


def test_status_probes_each_replica_of_a_list(
    stopped_platform: Path, replicas: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMOS_INFERENCE_ADDR", ",".join(replicas))
    assert main(["status", "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    inference = next(service for service in document["services"] if service["name"] == "inference")
    assert inference == {
        "name": "inference",
        "address": ",".join(replicas),
        "health": "DEGRADED",
        "replicas": [{"address": replicas[0], "health": "SERVING"}, {"address": replicas[1], "health": "NOT_SERVING"}],
    }
    assert document["healthy"] is False

    assert main(["status"]) == 1
    table = capsys.readouterr().out
    lines = [line.split() for line in table.splitlines()]
    assert ["inference", replicas[0], "SERVING"] in lines and [replicas[1], "NOT_SERVING"] in lines
    assert "nats: unreachable at nats://127.0.0.1:1" in table


def test_status_finds_the_replicas_the_running_cluster_recorded(
    stopped_platform: Path, replicas: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The one-machine setting names the first replica, as `llmos up --cluster` leaves it.
    monkeypatch.setenv("LLMOS_INFERENCE_ADDR", replicas[0])
    write_stack(settings(), [
        StackProcess(f"inference-{index + 1}", 1, f"inference-{index + 1}.log", "inference", addr)
        for index, addr in enumerate(replicas)
    ])
    assert main(["status", "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    inference = next(service for service in document["services"] if service["name"] == "inference")
    assert [replica["health"] for replica in inference["replicas"]] == ["SERVING", "NOT_SERVING"]
    assert [replica["address"] for replica in inference["replicas"]] == replicas
