"""Replicas of a service in its address setting (issue 16, item 2): LLMOS_<SERVICE>_ADDR may list
several IPv4:PORT; each replica binds LLMOS_LISTEN_PORT; a client's channel balances its calls
over the list with round_robin (two real in-process gRPC servers)."""

from __future__ import annotations

import os
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmos.grpcutil.client import channel_target, open_channel
from llmos.settings import PlatformSettings, SettingsError
from tests.conftest import free_port

pytestmark = pytest.mark.unit

ADDRESSES = {f"LLMOS_{name.upper()}_ADDR": f"127.0.0.1:{5000 + index}" for index, name in enumerate(
    ("ingest", "tokenizer", "inference", "retrieval", "speech", "dialogue", "audit")
)}


def settings_with(monkeypatch: pytest.MonkeyPatch, **variables: str) -> PlatformSettings:
    for key in [key for key in os.environ if key.startswith("LLMOS_")]:
        monkeypatch.delenv(key)
    for key, value in {**ADDRESSES, "LLMOS_NATS_URL": "nats://127.0.0.1:4222", **variables}.items():
        monkeypatch.setenv(key, value)
    return PlatformSettings(_env_file=None)  # type: ignore[call-arg]


def test_a_service_address_may_list_its_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_with(monkeypatch, LLMOS_INFERENCE_ADDR="127.0.0.1:5101,127.0.0.1:5102", LLMOS_LISTEN_PORT="5102")
    assert settings.service_addr("inference") == "127.0.0.1:5101,127.0.0.1:5102"
    assert settings.listen_addr("inference") == "127.0.0.1:5102"  # this replica's own port
    assert settings.listen_addr("tokenizer") == "127.0.0.1:5102"  # LISTEN_PORT wins for every service
    assert channel_target(settings.service_addr("inference")) == "ipv4:127.0.0.1:5101,127.0.0.1:5102"
    assert channel_target("inference:5003") == "inference:5003"


def test_a_replica_of_a_listed_service_needs_its_own_port(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_with(monkeypatch, LLMOS_INFERENCE_ADDR="127.0.0.1:5101,127.0.0.1:5102")
    with pytest.raises(SettingsError, match="LLMOS_LISTEN_PORT"):
        settings.listen_addr("inference")
    assert settings.listen_addr("tokenizer") == "127.0.0.1:5001"


@pytest.mark.parametrize("value", ["inference-1:5003,inference-2:5003", "127.0.0.1:5101,", "127.0.0.1:99999"])
def test_a_list_takes_ipv4_addresses_only(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    with pytest.raises(ValueError, match="LLMOS|IPv4|HOST:PORT"):
        settings_with(monkeypatch, LLMOS_INFERENCE_ADDR=value)


async def test_calls_are_balanced_over_every_listed_replica_and_avoid_a_stopped_one() -> None:
    servers, ports = [], []
    for answer in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING):
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        await servicer.set("replica", answer)  # tells the replicas apart
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port(f"127.0.0.1:{free_port()}"))
        await server.start()
        servers.append(server)
    channel = open_channel(",".join(f"127.0.0.1:{port}" for port in ports))
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="replica")
        await stub.Check(request, timeout=5, wait_for_ready=True)
        answers = Counter([(await stub.Check(request, timeout=5)).status for _ in range(10)])
        assert answers[health_pb2.HealthCheckResponse.SERVING] >= 4 and answers[health_pb2.HealthCheckResponse.NOT_SERVING] >= 4

        await servers[0].stop(grace=None)
        # A moment for the channel to see the connection go; then every call reaches the other.
        await stub.Check(request, timeout=5, wait_for_ready=True)
        answers = Counter()
        for _ in range(10):
            try:
                answers[(await stub.Check(request, timeout=5)).status] += 1
            except grpc.aio.AioRpcError as exc:
                answers[exc.code().name] += 1
        assert answers[health_pb2.HealthCheckResponse.NOT_SERVING] >= 9, answers
    finally:
        await channel.close()
        for server in servers:
            await server.stop(grace=None)
