"""Small helpers for tests that call the services over gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc
import pytest

from llmos.clients import Metadata, ServiceClient
from tests.conftest import TEST_API_KEY, RunningStack

Client = TypeVar("Client", bound=ServiceClient)


def bearer_of(key: str) -> Metadata:
    """The metadata of a call made with API key `key`."""
    return (("authorization", f"Bearer {key}"),)


# Callers of the keys in tests.conftest.TEST_KEYS.
ADMIN = bearer_of(TEST_API_KEY)  # tester, admin of acme
ACME_USER = bearer_of("user-key-acme")  # alice, user of acme
ACME_OPERATOR = bearer_of("operator-key-acme")  # olga, operator of acme
GLOBEX_USER = bearer_of("user-key-globex")  # bob, user of globex


async def call_with_raw_bytes(addr: str, method: str, payload: bytes) -> grpc.aio.AioRpcError:
    """Send bytes no Python client could build (e.g. invalid UTF-8 in a string field); the error."""
    async with grpc.aio.insecure_channel(addr) as channel:
        call = channel.unary_unary(method, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(payload, metadata=ADMIN, timeout=10)
    return error.value


@asynccontextmanager
async def connected(stack: RunningStack, client: type[Client], metadata: Metadata = ADMIN) -> AsyncIterator[Client]:
    """The typed client (`llmos.clients`) of one service of the test stack, calling as `metadata`."""
    async with grpc.aio.insecure_channel(stack.addr(client.service)) as channel:
        yield client(channel, metadata)
