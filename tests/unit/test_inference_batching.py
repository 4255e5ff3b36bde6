"""The embed batcher, the sampler and the prefix cache, in memory."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Sequence

import numpy as np
import pytest

from llmos.errors import ResourceExhausted
from llmos.v1 import common_pb2
from services.inference.batching import EmbedBatcher
from services.inference.decoder import CachedPrefix
from services.inference.scheduler import PrefixCache, SamplingConfig, sample

pytestmark = pytest.mark.unit


class RecordingModel:
    """Vectors derived from the text; remembers each batch and can be slowed down."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.delay_s = delay_s

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.batches.append(list(texts))
        time.sleep(self.delay_s)
        return np.array([[len(text), hash(text) % 1000] for text in texts], dtype=np.float32)


async def make_batcher(
    model: RecordingModel, max_batch: int = 4, delay_s: float = 0.02, queue: int = 100, max_tokens: int = 10_000
) -> EmbedBatcher:
    batcher = EmbedBatcher(model, max_batch, max_tokens, delay_s, queue)
    batcher.start()
    return batcher


def embed(batcher: EmbedBatcher, texts: list[str], priority: int, bounded: bool = True) -> Awaitable[np.ndarray]:
    """Embed with one token per character, so a text's length is its token count."""
    return batcher.embed(texts, [len(text) for text in texts], priority, bounded=bounded)


async def test_concurrent_callers_share_batches_and_get_their_own_vectors() -> None:
    model = RecordingModel()
    batcher = await make_batcher(model)
    texts = [f"text number {i}" for i in range(8)]
    results = await asyncio.gather(*(embed(batcher, [text], common_pb2.PRIORITY_STANDARD) for text in texts))
    for text, vectors in zip(texts, results, strict=True):
        assert vectors.shape == (1, 2) and vectors[0, 1] == hash(text) % 1000
    assert len(model.batches) == 2 and all(len(batch) == 4 for batch in model.batches)
    await batcher.stop()


async def test_a_lone_text_waits_at_most_the_delay() -> None:
    batcher = await make_batcher(RecordingModel(), delay_s=0.05)
    started = time.perf_counter()
    await embed(batcher, ["alone"], common_pb2.PRIORITY_STANDARD)
    assert 0.04 < time.perf_counter() - started < 0.5
    await batcher.stop()


class SlowBulkModel(RecordingModel):
    """Takes `delay_s` for a batch of bulk texts, no time for others."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.batches.append(list(texts))
        if any(text.startswith("bulk") for text in texts):
            time.sleep(self.delay_s)
        return np.array([[len(text), hash(text) % 1000] for text in texts], dtype=np.float32)


async def test_interactive_texts_do_not_wait_for_a_running_bulk_batch() -> None:
    model = SlowBulkModel(delay_s=0.3)
    batcher = await make_batcher(model, max_batch=4, delay_s=0.0)
    bulk = asyncio.ensure_future(embed(batcher, [f"bulk {i}" for i in range(8)], common_pb2.PRIORITY_BATCH))
    await asyncio.sleep(0.05)  # the first bulk batch is running, the second waits
    started = time.perf_counter()
    await embed(batcher, ["live update"], common_pb2.PRIORITY_INTERACTIVE)
    assert time.perf_counter() - started < 0.2  # ran beside the bulk batch, not after it
    assert not bulk.done()
    await bulk
    await batcher.stop()


async def test_batches_group_texts_of_similar_length() -> None:
    model = RecordingModel(delay_s=0.02)
    batcher = await make_batcher(model, max_batch=2, delay_s=0.0)
    blocker = asyncio.ensure_future(embed(batcher, ["first"], common_pb2.PRIORITY_STANDARD))
    await asyncio.sleep(0.005)
    texts = ["a" * 5, "b" * 500, "c" * 6, "d" * 490]
    await asyncio.gather(blocker, embed(batcher, texts, common_pb2.PRIORITY_STANDARD))
    assert sorted(map(sorted, model.batches[1:])) == [["a" * 5, "c" * 6], ["b" * 500, "d" * 490]]
    await batcher.stop()


async def test_a_full_queue_refuses_with_a_retry_hint_but_the_bus_path_waits() -> None:
    batcher = await make_batcher(RecordingModel(delay_s=0.05), max_batch=2, delay_s=0.0, queue=3)
    first = asyncio.ensure_future(embed(batcher, ["a", "b", "c"], common_pb2.PRIORITY_STANDARD))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted) as error:
        await embed(batcher, ["d", "e"], common_pb2.PRIORITY_STANDARD)
    assert error.value.retry_after_s > 0
    unbounded = await embed(batcher, ["d", "e"], common_pb2.PRIORITY_STANDARD, bounded=False)
    assert unbounded.shape == (2, 2)
    await first
    await batcher.stop()


class HeldModel(RecordingModel):
    """A model call that runs until the test lets it finish."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        vectors = super().__call__(texts)
        self.release.wait(timeout=10)
        return vectors


async def test_a_cancelled_caller_s_texts_are_not_embedded() -> None:
    model = HeldModel()
    batcher = await make_batcher(model, max_batch=1, delay_s=0.0)
    running = asyncio.ensure_future(embed(batcher, ["running"], common_pb2.PRIORITY_STANDARD))
    while not model.batches:  # the lane is busy with "running" ...
        await asyncio.sleep(0.001)
    gone = asyncio.ensure_future(embed(batcher, ["gone"], common_pb2.PRIORITY_STANDARD))
    await asyncio.sleep(0.01)  # ... so "gone" waits in the queue when its caller goes away
    gone.cancel()
    model.release.set()
    await running
    await embed(batcher, ["after"], common_pb2.PRIORITY_STANDARD)
    assert ["gone"] not in model.batches
    await batcher.stop()


async def test_long_texts_batch_within_the_token_budget() -> None:
    model = RecordingModel()
    batcher = await make_batcher(model, max_batch=64, delay_s=0.0, max_tokens=1000)
    await embed(batcher, [chr(ord("a") + i % 26) * 250 for i in range(40)], common_pb2.PRIORITY_BATCH)
    assert [len(batch) for batch in model.batches] == [4] * 10
    assert all(len(batch) * max(map(len, batch)) <= 1000 for batch in model.batches)
    await batcher.stop()


async def test_short_texts_fill_whole_batches_under_the_token_budget() -> None:
    model = RecordingModel(delay_s=0.01)
    batcher = await make_batcher(model, max_batch=16, delay_s=0.0, max_tokens=1000)
    blocker = asyncio.ensure_future(embed(batcher, ["first"], common_pb2.PRIORITY_STANDARD))
    await asyncio.sleep(0.005)
    await asyncio.gather(blocker, embed(batcher, [f"query {i:02d}" for i in range(32)], common_pb2.PRIORITY_STANDARD))
    assert [len(batch) for batch in model.batches[1:]] == [16, 16]
    await batcher.stop()


def test_greedy_and_seeded_sampling() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert sample(logits, SamplingConfig(10), np.random.default_rng()) == 1
    config = SamplingConfig(10, temperature=1.0, top_k=2)
    draws = [sample(logits, config, np.random.default_rng(3)) for _ in range(5)]
    assert len(set(draws)) == 1  # same seed, same draw
    many = {sample(logits, config, np.random.default_rng(seed)) for seed in range(200)}
    assert many == {1, 2}  # top-k keeps the two best only
    nucleus = {sample(logits, SamplingConfig(10, temperature=1.0, top_p=0.3), np.random.default_rng(s)) for s in range(100)}
    assert nucleus == {1}


def prefix(ids: list[int]) -> CachedPrefix:
    shape = (2, 1, len(ids), 4)
    return CachedPrefix(np.array(ids), np.zeros(shape, np.float32), np.zeros(shape, np.float32))


def test_prefix_cache_finds_the_longest_shared_prefix_and_evicts_by_tokens() -> None:
    cache = PrefixCache(max_tokens=10, min_tokens=3)
    cache.add("acme", prefix([1, 2, 3, 4, 5]))
    cache.add("acme", prefix([1, 2, 9, 9]))
    entry, common = cache.lookup("acme", np.array([1, 2, 3, 4, 7, 8]))
    assert common == 4 and entry is not None and list(entry.token_ids) == [1, 2, 3, 4, 5]
    assert cache.lookup("acme", np.array([1, 2, 8]))[1] == 0  # 2 shared tokens is under min_tokens
    cache.add("acme", prefix([5, 5, 5, 5]))  # 13 tokens > 10: the least recently used goes
    assert cache.tokens <= 10
    assert cache.lookup("acme", np.array([1, 2, 9, 9]))[1] == 0
    assert cache.lookup("globex", np.array([1, 2, 3, 4, 7, 8]))[1] == 0  # another tenant's entry is never found
