"""Handling several bus messages in one call: what arrives while a call runs goes into the next.

The bus hands a consumer's messages to concurrent handlers, one message each. A handler that
`submit`s its message here gets its own result, but the work runs over every message waiting
at that moment: the first runs alone at once (no waiting for company), those that arrive while
it runs go together next, up to `max_items`. Items with the same `key` never share a call (two
versions of one document, say, are ordered by their calls). A failure of the call fails each of
its items, so every message is retried on its own by the bus; a per-item failure (the work
returns an exception in that item's place) fails only that item.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Waiting(Generic[T, R]):
    item: T
    future: asyncio.Future[R] = field(repr=False)


class Gatherer(Generic[T, R]):
    def __init__(
        self,
        work: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]],
        max_items: int,
        key: Callable[[T], Hashable] = id,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._work = work
        self._max_items = max_items
        self._key = key
        self._waiting: list[_Waiting[T, R]] = []
        self._draining: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """`item`'s result, from a call shared with the items waiting beside it."""
        waiting = _Waiting[T, R](item, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        return await waiting.future

    def _next_call(self) -> list[_Waiting[T, R]]:
        """The oldest waiting items, up to max_items and one per key; the rest stay in order."""
        chosen: list[_Waiting[T, R]] = []
        keys: set[Hashable] = set()
        rest: list[_Waiting[T, R]] = []
        for waiting in self._waiting:
            if waiting.future.done():  # its handler was cancelled
                continue
            key = self._key(waiting.item)
            if len(chosen) < self._max_items and key not in keys:
                chosen.append(waiting)
                keys.add(key)
            else:
                rest.append(waiting)
        self._waiting = rest
        return chosen

    async def _drain(self) -> None:
        while call := self._next_call():
            try:
                results = await self._work([waiting.item for waiting in call])
                if len(results) != len(call):
                    raise RuntimeError(f"the gathered work returned {len(results)} results for {len(call)} items")
            except asyncio.CancelledError:
                for waiting in [*call, *self._waiting]:  # shutting down: no caller waits forever
                    waiting.future.cancel()
                self._waiting = []
                raise
            except Exception as exc:  # noqa: BLE001 - each caller gets the failure of its call
                results = [exc] * len(call)
            for waiting, result in zip(call, results, strict=True):
                if waiting.future.done():
                    continue
                if isinstance(result, BaseException):
                    waiting.future.set_exception(result)
                else:
                    waiting.future.set_result(result)
