"""A stream without a leader is waited for: a KV write or a publish that finds no leader is sent
again until the election is over, and fails as Unavailable only when the outage outlasts the
retry window (issue 16, item 3: a NATS node killed while documents flow lost six of them to the
dead-letter subject, their handlers' status writes failing three times inside three seconds)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from nats.errors import NoRespondersError
from nats.js.errors import NoStreamResponseError

from llmos.bus import outage
from llmos.bus.kv import NatsBucket
from llmos.errors import Unavailable

pytestmark = pytest.mark.unit


class LeaderlessKeyValue:
    """A KV bucket whose stream answers nothing for its first `outage_calls` writes."""

    def __init__(self, outage_calls: int) -> None:
        self.outage_calls = outage_calls
        self.calls = 0
        self.stored: dict[str, bytes] = {}

    async def put(self, key: str, value: bytes) -> int:
        self.calls += 1
        if self.calls <= self.outage_calls:
            raise NoStreamResponseError if self.calls % 2 else NoRespondersError
        self.stored[key] = value
        return self.calls


def bucket_over(kv: LeaderlessKeyValue) -> NatsBucket:
    async def open_bucket() -> Any:
        return kv

    return NatsBucket("document_status", open_bucket)


async def test_a_write_during_an_election_lands_once_the_stream_has_a_leader() -> None:
    kv = LeaderlessKeyValue(outage_calls=3)
    assert await bucket_over(kv).put("doc", b"RECEIVED") == 4
    assert kv.stored == {"doc": b"RECEIVED"}


async def test_an_outage_longer_than_the_window_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outage, "OUTAGE_RETRY_S", 0.5)
    kv = LeaderlessKeyValue(outage_calls=10**6)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="document_status"):
        await bucket_over(kv).put("doc", b"RECEIVED")
    assert 0.3 <= time.monotonic() - started < 2.0
    assert kv.calls > 1 and kv.stored == {}


async def test_other_errors_are_not_retried() -> None:
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("not an outage")

    with pytest.raises(ValueError):
        await outage.while_leaderless(refused, "test")
    assert calls == 1
