"""The intent classifier for concurrent turns: one prediction call at a time, for every message waiting.

A call of the classifier costs mostly its fixed overhead (input checks, the TF-IDF machinery):
64 messages one by one took 0.6-1.0 s of the dialogue's event loop here, in one call 0.07-0.12 s.
Messages that arrive while a call runs wait for the next one, which takes them all; a lone
message is classified at once. The call runs in a worker thread, so the event loop goes on
answering (and refusing) other turns meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from llmos.intents import Prediction


class Classifier(Protocol):
    def predict(self, texts: Sequence[str], vectors: np.ndarray) -> list[Prediction]: ...


class CoalescingClassifier:
    def __init__(self, classifier: Classifier) -> None:
        self._classifier = classifier
        self._waiting: list[tuple[str, np.ndarray, asyncio.Future[Prediction]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def predict(self, message: str, vector: np.ndarray) -> Prediction:
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        self._waiting.append((message, vector, future))
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    predictions = await asyncio.to_thread(
                        self._classifier.predict, [message for message, _, _ in batch], np.stack([vector for _, vector, _ in batch])
                    )
                except Exception as error:  # noqa: BLE001 - each turn of the call fails with it, none swallowed
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, _, future), prediction in zip(batch, predictions, strict=True):
                    if not future.done():  # its turn may have gone away
                        future.set_result(prediction)
        finally:
            self._draining = None
