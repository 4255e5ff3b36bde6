"""The versioned store over the in-memory bucket: compare-and-set that retries lost races, records
kept apart by tenant, sealing bound to the record's key, values stamped as they are written."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from llmos.crypto import AtRest, Sealer, new_key_entry
from llmos.errors import FailedPrecondition, Unavailable
from llmos.ports import VersionedStore, tenant_key
from llmos.testing import MemoryBucket

pytestmark = pytest.mark.unit


class RacingBucket(MemoryBucket):
    """Another writer rewrites the key between each read and write, `races` times."""

    def __init__(self, races: int) -> None:
        super().__init__()
        self.races = races

    async def update(self, key: str, value: bytes, revision: int) -> int:
        if self.races:
            self.races -= 1
            await self.put(key, (await self.get(key)).value)
        return await super().update(key, value, revision)


Counter = dict[str, int]


def counters(
    bucket: MemoryBucket, sealing: AtRest | None = None, stamp: Callable[[Counter], None] | None = None
) -> VersionedStore[Counter]:
    return VersionedStore(bucket, lambda value: json.dumps(value).encode(), json.loads, "counter", sealing, stamp)


async def value_of(store: VersionedStore[Counter], tenant: str, name: str) -> Counter:
    stored = await store.get(tenant, name)
    assert stored is not None
    return stored.value


def increment(counter: Counter) -> bool:
    counter["n"] += 1
    return True


async def test_change_retries_the_writes_another_writer_won_then_gives_up() -> None:
    bucket = RacingBucket(races=2)
    store = counters(bucket)
    await store.create("acme", "c", {"n": 0})
    assert await store.change("acme", "c", increment)
    assert await value_of(store, "acme", "c") == {"n": 1}
    bucket.races = 3
    with pytest.raises(Unavailable, match="counter 'c' kept changing under 3 attempts"):
        await store.change("acme", "c", increment, attempts=3)


async def test_change_creates_a_missing_record_only_when_told_how_and_writes_only_when_applied() -> None:
    store = counters(MemoryBucket())
    assert not await store.change("acme", "c", increment)
    assert await store.get("acme", "c") is None
    assert await store.change("acme", "c", increment, missing=lambda: {"n": 10})
    assert not await store.change("acme", "c", lambda counter: False)
    stored = await store.get("acme", "c")
    assert stored is not None and stored.value == {"n": 11}
    with pytest.raises(FailedPrecondition):
        await store.update("acme", "c", {"n": 0}, stored.revision - 1)
    with pytest.raises(FailedPrecondition):
        await store.create("acme", "c", {"n": 0})


async def test_records_are_kept_per_tenant_and_stamped_as_they_are_written() -> None:
    written: list[Counter] = []
    store = counters(MemoryBucket(), stamp=written.append)
    await store.put("acme", "c", {"n": 1})
    await store.put("globex", "c", {"n": 2})
    assert await value_of(store, "acme", "c") == {"n": 1}
    await store.delete("globex", "c")
    assert await store.get("globex", "c") is None and await store.get("acme", "c") is not None
    assert written == [{"n": 1}, {"n": 2}]


async def test_a_sealed_record_copied_under_another_key_does_not_open() -> None:
    bucket = MemoryBucket()
    store = counters(bucket, sealing=AtRest(Sealer.from_spec(new_key_entry("k1")), "counters"))
    await store.put("acme", "c", {"n": 1})
    sealed = bucket.entries[tenant_key("acme", "c")].value
    assert b'"n"' not in sealed
    await bucket.put(tenant_key("globex", "c"), sealed)
    with pytest.raises(FailedPrecondition, match="copied from another record"):
        await store.get("globex", "c")
