"""Dynamic batching of embedding requests.

Texts from every caller (Embed RPCs, the chunk consumer) wait in one queue per priority class.
Two lanes serve the queues, each with its own worker and model-call thread, so their calls run
side by side: the interactive lane (live updates, search queries) never waits for a bulk batch
to finish, and the bulk lane serves standard, then batch texts. A lane's worker takes the oldest
text of its most urgent class and fills the batch with texts of that class closest to it in
token length (less padding), waiting at most `max_delay_s` for company when the batch is not
full. A batch is full at `max_batch` texts or `max_batch_tokens` padded tokens (texts x
longest), which keeps each call short, so an interactive call shares the cores with a bulk one
only briefly; on CPU the model's cost is near-linear in padded tokens, so small batches of long
texts cost no throughput, and short texts still batch by the dozen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import metrics

from llmos.errors import ResourceExhausted
from llmos.telemetry import seconds_histogram
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
# The lanes: the priority ranks each serves, most urgent first.
LANES: dict[str, tuple[int, ...]] = {"interactive": (0,), "bulk": (1, 2)}

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
        max_batch: int,
        max_batch_tokens: int,
        max_delay_s: float,
        queue_size: int,
    ) -> None:
        self._embed = embed
        # One model-call thread per lane: the embed function must allow concurrent calls
        # (an ONNX Runtime session does).
        self._executor = ThreadPoolExecutor(max_workers=len(LANES), thread_name_prefix="embed")
        self._max_batch = max_batch
        self._max_batch_tokens = max_batch_tokens
        self._max_delay_s = max_delay_s
        self._queue_size = queue_size
        self._queues: list[list[_Pending]] = [[] for _ in PRIORITY_NAMES]
        self._arrivals = {lane: asyncio.Event() for lane in LANES}
        self._lane_of_rank = {rank: lane for lane, ranks in LANES.items() for rank in ranks}
        self._tasks: list[asyncio.Task[None]] = []
        # Seconds per text, smoothed: the basis of the retry hint when the queue is full.
        self._seconds_per_text = 0.005
        meter = metrics.get_meter("llmos.inference")
        self._batch_size = meter.create_histogram(
            "llmos.inference.embed.batch_size", unit="{text}", description="texts per embedding model call"
        )
        self._queue_time = meter.create_histogram(
            "llmos.inference.embed.queue_time", unit="ms", description="time a text waited for its batch"
        )
        self._call_duration = seconds_histogram(meter, "llmos.inference.embed.duration", "time one embedding model call took")

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(lane), name=f"embed-{lane}") for lane in LANES]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)

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
        rank = priority_rank(priority)
        self._queues[rank].extend(pending)
        self._arrivals[self._lane_of_rank[rank]].set()
        try:
            return np.stack(await asyncio.gather(*(item.future for item in pending)))
        except asyncio.CancelledError:
            for item in pending:
                item.future.cancel()  # the worker skips cancelled texts
            raise

    def _most_urgent(self, lane: str) -> int | None:
        """The most urgent rank of `lane` with texts waiting."""
        return next((rank for rank in LANES[lane] if self._queues[rank]), None)

    def _next_batch(self, rank: int) -> list[_Pending]:
        """The oldest text of the class, with the texts nearest its length that fit."""
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
        return batch

    def _can_fill(self, queue: list[_Pending]) -> bool:
        """Whether the queued texts already make a full batch, so waiting for more gains nothing."""
        return len(queue) >= self._max_batch or sum(item.tokens for item in queue) >= self._max_batch_tokens

    async def _wait_for_company(self, lane: str) -> int | None:
        """Give a batch that is not full up to max_delay_s (from its oldest text) to fill; its rank."""
        arrival = self._arrivals[lane]
        while True:
            rank = self._most_urgent(lane)
            if rank is None:
                return None
            queue = self._queues[rank]
            remaining = queue[0].arrived + self._max_delay_s - time.perf_counter()
            if self._can_fill(queue) or remaining <= 0:
                return rank
            arrival.clear()
            try:
                await asyncio.wait_for(arrival.wait(), remaining)
            except TimeoutError:
                return rank

    async def _run(self, lane: str) -> None:
        loop = asyncio.get_running_loop()
        arrival = self._arrivals[lane]
        while True:
            for rank in LANES[lane]:
                self._queues[rank][:] = [item for item in self._queues[rank] if not item.future.cancelled()]
            if self._most_urgent(lane) is None:
                arrival.clear()
                await arrival.wait()
                continue
            rank = await self._wait_for_company(lane)
            if rank is None:
                continue
            batch = self._next_batch(rank)
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
            self._call_duration.record(elapsed, {"priority": PRIORITY_NAMES[rank]})
            self._seconds_per_text = 0.8 * self._seconds_per_text + 0.2 * elapsed / len(batch)
            for item, vector in zip(batch, vectors, strict=True):
                if not item.future.done():
                    item.future.set_result(vector)

