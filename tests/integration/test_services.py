"""Every service starts against a real nats-server, reports SERVING and answers its API."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmos.clients import TokenizerClient
from llmos.errors import Unauthenticated
from llmos.settings import SERVICE_NAMES
from tests.conftest import RunningStack
from tests.grpc_helpers import connected

pytestmark = pytest.mark.integration

FULL_NAMES = {name: f"llmos.v1.{name.capitalize()}Service" for name in SERVICE_NAMES}


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_service_is_serving_and_reflects_its_api(stack: RunningStack, service: str) -> None:
    async with grpc.aio.insecure_channel(stack.addr(service)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", FULL_NAMES[service]):
            response = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        async for response in responses:
            listed = {service.name for service in response.list_services_response.service}
            assert {FULL_NAMES[service], "grpc.health.v1.Health"} <= listed
            break


async def test_calls_without_a_key_are_unauthenticated(stack: RunningStack) -> None:
    for credentials in ((), (("authorization", "Bearer wrong"),)):
        async with connected(stack, TokenizerClient, credentials) as tokenizer:
            with pytest.raises(Unauthenticated):
                await tokenizer.count(["hello"], 5)
