"""A JetStream KV bucket behind the ports: nats.js errors arrive as the platform's errors."""

from __future__ import annotations

import uuid

import nats
import pytest

from llmos.bus.broker import declare_buckets
from llmos.bus.kv import NatsBucket
from llmos.errors import FailedPrecondition, NotFound, Unavailable
from llmos.ports import Versioned
from tests.conftest import NatsServer

pytestmark = pytest.mark.integration


async def test_a_nats_bucket_speaks_the_platform_errors(nats_server: NatsServer) -> None:
    connection = await nats.connect(nats_server.url)
    js = connection.jetstream()
    await declare_buckets(js)
    bucket = NatsBucket("user_profiles", lambda: js.key_value("user_profiles"))
    key = uuid.uuid4().hex
    try:
        with pytest.raises(NotFound):
            await bucket.get(key)
        first = await bucket.create(key, b"one")
        with pytest.raises(FailedPrecondition):
            await bucket.create(key, b"taken")
        second = await bucket.update(key, b"two", first)
        with pytest.raises(FailedPrecondition):
            await bucket.update(key, b"stale", first)
        assert await bucket.get(key) == Versioned(b"two", second)
        await bucket.delete(key)
        with pytest.raises(NotFound):
            await bucket.get(key)
        assert await bucket.create(key, b"anew") > second  # a deleted key can be created again
    finally:
        await connection.close()
    with pytest.raises(Unavailable):
        await bucket.put(key, b"after close")
