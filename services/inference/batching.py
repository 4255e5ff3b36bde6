"""Dynamic batching of embedding requests.

Texts from every caller (Embed RPCs, the chunk consumer) wait in one queue per priority class.
The worker takes the oldest text of the most urgent class and fills the batch with texts of that
class closest to it in token length (less padding), waiting at most `max_delay_s` for company
when the batch is not full. A batch is full at `max_batch` texts or `max_batch_tokens` padded
tokens (texts x longest), which bounds how long one model call runs: an interactive text waits at
most for the one batch already running, never behind a bulk backlog, and that batch is short.
On CPU the model's cost is nearly linear in padded tokens, so small batches of long texts cost
no throughput; short texts still batch by the dozen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import metrics

from llmos.errors import ResourceExhausted
from llmos.v1 import common_pb2

# Scheduling order: lower runs first. PRIORITY_UNSPECIFIED counts as standard.
PRIORITY_RANK = {
    common_pb2.PRIORITY_INTERACTIVE: 0,
    common_pb2.PRIORITY_STANDARD: 1,
    common_pb2.PRIORITY_UNSPECIFIED: 1,
    common_pb2.PRIORITY_BATCH: 2,
}
PRIORITY_NAMES = {0: "interactive", 1: "standard", 2: "batch"}
# How many queued texts of a class are considered when choosing lengths to batch together.
LENGTH_WINDOW_BATCHES = 8

EmbedFunction = Callable[[Sequence[str]], np.ndarray]


def priority_rank(priority: int) -> int:
    return PRIORITY_RANK.get(priority, 1)  # type: ignore[call-overload]


@dataclass
class _Pending:
    text: str
    tokens: int
    arrived: float
    future: asyncio.Future[np.ndarray] = field(repr=False)


class EmbedBatcher:
    def __init__(
        self,
        embed: EmbedFunction,
        executor: Executor,
        max_batch: int,
        max_batch_tokens: int,
        max_delay_s: float,
        queue_size: int,
    ) -> None:
        self._embed = embed
        self._executor = executor
        self._max_batch = max_batch
        self._max_batch_tokens = max_batch_tokens
        self._max_delay_s = max_delay_s
        self._queue_size = queue_size
        self._queues: list[list[_Pending]] = [[] for _ in PRIORITY_NAMES]
        self._arrival = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Seconds per text, smoothed: the basis of the retry hint when the queue is full.
        self._seconds_per_text = 0.005
        meter = metrics.get_meter("llmos.inference")
        self._batch_size = meter.create_histogram(
            "llmos.inference.embed.batch_size", unit="{text}", description="texts per embedding model call"
        )
        self._queue_time = meter.create_histogram(
            "llmos.inference.embed.queue_time", unit="ms", description="time a text waited for its batch"
        )

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="embed-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def embed(
        self, texts: Sequence[str], tokens: Sequence[int], priority: int, bounded: bool = True
    ) -> np.ndarray:
        """(len(texts), dim) vectors; queued with the others of the same priority class.

        `tokens` is each text's length in model tokens (after truncation), for batching by length.
        `bounded=False` skips admission control, for callers that bound their own concurrency
        (the chunk consumer, whose messages would otherwise be dead-lettered under load).
        """
        if bounded and self.waiting + len(texts) > self._queue_size:
            retry = max(0.1, self.waiting * self._seconds_per_text)
            raise ResourceExhausted(
                f"the embedding queue holds {self.waiting} texts (limit {self._queue_size})", retry_after_s=retry
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        pending = [_Pending(text, count, now, loop.create_future()) for text, count in zip(texts, tokens, strict=True)]
        self._queues[priority_rank(priority)].extend(pending)
        self._arrival.set()
        try:
            return np.stack(await asyncio.gather(*(item.future for item in pending)))
        except asyncio.CancelledError:
            for item in pending:
                item.future.cancel()  # the worker skips cancelled texts
            raise

    def _next_batch(self) -> tuple[int, list[_Pending]]:
        """The oldest text of the most urgent class, with the texts nearest its length that fit."""
        rank = next(rank for rank, queue in enumerate(self._queues) if queue)
        queue = self._queues[rank]
        anchor = queue[0]
        window = sorted(queue[1:self._max_batch * LENGTH_WINDOW_BATCHES], key=lambda item: abs(item.tokens - anchor.tokens))
        batch, longest = [anchor], anchor.tokens
        for item in window:
            if len(batch) == self._max_batch:
                break
            if (len(batch) + 1) * max(longest, item.tokens) <= self._max_batch_tokens:
                batch.append(item)
                longest = max(longest, item.tokens)
        chosen = {id(item) for item in batch}
        self._queues[rank] = [item for item in queue if id(item) not in chosen]
        return rank, batch

    def _can_fill(self, queue: list[_Pending]) -> bool:
        """Whether the queued texts already make a full batch, so waiting for more gains nothing."""
        return len(queue) >= self._max_batch or sum(item.tokens for item in queue) >= self._max_batch_tokens

    async def _wait_for_company(self) -> None:
        """Give a batch that is not full up to max_delay_s (from its oldest text) to fill."""
        while True:
            rank = next(rank for rank, queue in enumerate(self._queues) if queue)
            queue = self._queues[rank]
            remaining = queue[0].arrived + self._max_delay_s - time.perf_counter()
            if self._can_fill(queue) or remaining <= 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for queue in self._queues:
                queue[:] = [item for item in queue if not item.future.cancelled()]
            if not self.waiting:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            await self._wait_for_company()
            rank, batch = self._next_batch()
            batch = [item for item in batch if not item.future.cancelled()]
            if not batch:
                continue
            started = time.perf_counter()
            for item in batch:
                self._queue_time.record((started - item.arrived) * 1000, {"priority": PRIORITY_NAMES[rank]})
            self._batch_size.record(len(batch), {"priority": PRIORITY_NAMES[rank]})
            try:
                vectors = await loop.run_in_executor(self._executor, self._embed, [item.text for item in batch])
            except Exception as exc:  # noqa: BLE001 - the callers get the model's failure
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            self._seconds_per_text = 0.8 * self._seconds_per_text + 0.2 * elapsed / len(batch)
            for item, vector in zip(batch, vectors, strict=True):
                if not item.future.done():
                    item.future.set_result(vector)

