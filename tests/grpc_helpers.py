"""Small helpers for tests that call the services over gRPC."""

from __future__ import annotations

import grpc
import pytest

from tests.conftest import TEST_API_KEY

ADMIN = (("authorization", f"Bearer {TEST_API_KEY}"),)
GLOBEX_USER = (("authorization", "Bearer user-key-globex"),)


async def call_with_raw_bytes(addr: str, method: str, payload: bytes) -> grpc.aio.AioRpcError:
    """Send bytes no Python client could build (e.g. invalid UTF-8 in a string field); the error."""
    async with grpc.aio.insecure_channel(addr) as channel:
        call = channel.unary_unary(method, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(payload, metadata=ADMIN, timeout=10)
    return error.value
