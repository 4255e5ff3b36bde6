"""Many chat turns at once (issue 15, item 5): source sentences embedded once for concurrent turns,
the messages of concurrent turns classified in one call, and turn-level admission that refuses a
turn the turns in flight would make too late."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from llmos.deadline import Deadline
from llmos.errors import DeadlineExceeded, ResourceExhausted
from llmos.intents import Prediction
from llmos.v1 import dialogue_pb2
from services.dialogue.admission import TurnAdmission
from services.dialogue.answers import SentenceVectors
from services.dialogue.intent_batch import CoalescingClassifier
from tests.unit.test_dialogue import ADMIN, RETURNS, ScriptedGenerator, make_core

pytestmark = pytest.mark.unit


class GatedEmbedder:
    """Records each call's texts and answers only when the test opens the gate."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()

    async def embed(self, texts: Sequence[str], timeout_s: float = 0.0) -> np.ndarray:
        self.calls.append(list(texts))
        await self.gate.wait()
        return np.array([[float(len(text)), 1.0] for text in texts], dtype=np.float32)


async def test_concurrent_turns_embed_each_source_sentence_once() -> None:
    embedder = GatedEmbedder()
    vectors = SentenceVectors(embedder, fill_timeout_s=10)
    first = asyncio.create_task(vectors.of(["a b", "c d e"], 10))
    second = asyncio.create_task(vectors.of(["c d e", "f", "a b"], 10))
    await asyncio.sleep(0)
    embedder.gate.set()
    one, two = await asyncio.gather(first, second)
    assert sorted(text for call in embedder.calls for text in call) == ["a b", "c d e", "f"]
    assert one[:, 0].tolist() == [3.0, 5.0]
    assert two[:, 0].tolist() == [5.0, 1.0, 3.0]
    assert (await vectors.of(["f", "a b"], 10))[:, 0].tolist() == [1.0, 3.0]
    assert len(embedder.calls) == 2  # the last from the cache


async def test_a_turn_that_goes_away_leaves_the_shared_embedding_to_the_others() -> None:
    embedder = GatedEmbedder()
    vectors = SentenceVectors(embedder, fill_timeout_s=10)
    leaving = asyncio.create_task(vectors.of(["a b"], 10))
    await asyncio.sleep(0)
    staying = asyncio.create_task(vectors.of(["a b"], 10))
    await asyncio.sleep(0)
    leaving.cancel()
    embedder.gate.set()
    assert (await staying)[:, 0].tolist() == [3.0]
    assert len(embedder.calls) == 1


async def test_a_turn_out_of_time_fails_and_the_sentences_are_still_remembered() -> None:
    embedder = GatedEmbedder()
    vectors = SentenceVectors(embedder, fill_timeout_s=10)
    with pytest.raises(DeadlineExceeded, match="inference"):
        await vectors.of(["a b", "c d e"], 0.01)  # its own deadline; the shared call goes on
    embedder.gate.set()
    await asyncio.sleep(0.01)
    assert (await vectors.of(["c d e"], 0.01))[:, 0].tolist() == [5.0]
    assert len(embedder.calls) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_admission_refuses_a_turn_expected_past_its_deadline_with_the_time_to_wait() -> None:
    clock = Clock()
    admission = TurnAdmission(max_wait_s=None, clock=clock)
    with admission.turn(None), admission.turn(None):
        clock.now += 1.0  # two together in a second: 0.5 s a turn
    assert admission.seconds_per_turn == pytest.approx(0.5)
    turns = [admission.turn(None) for _ in range(3)]
    for turn in turns:
        turn.__enter__()
    # 3 in flight: a fourth finishes in about 2 s; with 1.2 s left it is refused, 0.8 s too late.
    with pytest.raises(ResourceExhausted) as refused:
        admission.check(Deadline(clock.now + 1.2))
    assert refused.value.retry_after_s == pytest.approx(0.8)
    assert "3 turns in flight" in refused.value.message
    admission.check(Deadline(clock.now + 2.5))  # in time: taken
    admission.check(None)
    with admission.turn(Deadline(clock.now + 0.1), refusable=False):  # a voice turn is always taken
        assert admission.in_flight == 4
    for turn in turns:
        turn.__exit__(None, None, None)
    assert admission.in_flight == 0


def test_admission_refuses_a_wait_longer_than_the_longest_allowed() -> None:
    clock = Clock()
    admission = TurnAdmission(max_wait_s=1.0, clock=clock)
    with admission.turn(None), admission.turn(None):
        clock.now += 0.8
    turns = [admission.turn(None) for _ in range(3)]
    for turn in turns[:2]:
        turn.__enter__()
    admission.check(None)  # waits 0.8 s behind two
    turns[2].__enter__()
    with pytest.raises(ResourceExhausted) as refused:
        admission.check(None)  # 1.2 s behind three
    assert refused.value.retry_after_s == pytest.approx(0.4)


def test_admission_measures_busy_time_per_turn_over_a_burst() -> None:
    clock = Clock()
    admission = TurnAdmission(max_wait_s=None, clock=clock)
    turns = [admission.turn(None) for _ in range(8)]
    for turn in turns:
        turn.__enter__()
    clock.now += 1.0  # all eight finish together, a second after they came: 1/8 s of work each
    for turn in turns:
        turn.__exit__(None, None, None)
    assert admission.seconds_per_turn == pytest.approx(1.0 / 8)
    clock.now += 60.0  # idle time is not busy time
    with admission.turn(None), admission.turn(None):
        clock.now += 0.25
    assert admission.seconds_per_turn == pytest.approx(0.125)
    with admission.turn(None):
        clock.now += 3.0  # a lone turn's time is mostly waiting on other services: not its cost under load
    assert admission.seconds_per_turn == pytest.approx(0.125)


def test_nothing_is_refused_before_a_pace_is_measured_or_with_no_turn_in_flight() -> None:
    clock = Clock()
    admission = TurnAdmission(max_wait_s=0.001, clock=clock)
    held = admission.turn(None)
    held.__enter__()
    admission.check(Deadline(clock.now + 0.001))  # no turn has finished yet: nothing known
    clock.now += 5.0
    held.__exit__(None, None, None)
    with admission.turn(None):
        clock.now += 5.0
    assert admission.seconds_per_turn is None  # lone turns measure nothing
    with admission.turn(None):
        admission.check(Deadline(clock.now + 0.001))
    with admission.turn(None), admission.turn(None):
        clock.now += 5.0
    admission.check(Deadline(clock.now + 0.001))  # alone: nothing would make it faster


async def test_a_chat_turn_is_refused_at_once_and_leaves_no_turn_counted() -> None:
    core, _, retriever = make_core(ScriptedGenerator(""), [RETURNS])
    request = dialogue_pb2.ChatRequest(message="How long do I have to return an item?")

    async def answer() -> list[dialogue_pb2.ChatResponse]:
        return [response async for response in core.chat(ADMIN, "acme", request, None, refusable=True)]

    answered = await asyncio.gather(answer(), answer())  # two together: a pace is measured
    assert all(responses[-1].final for responses in answered) and core.admission.in_flight == 0
    assert core.admission.seconds_per_turn is not None
    # Hold one turn in flight at its first message: a second with no time left is refused before any work.
    held = core.chat(ADMIN, "acme", request, None, refusable=True)
    await anext(held)
    searches = retriever.searches
    with pytest.raises(ResourceExhausted):
        await anext(core.chat(ADMIN, "acme", request, Deadline.after(1e-6), refusable=True))
    assert retriever.searches == searches and core.admission.in_flight == 1
    await held.aclose()
    assert core.admission.in_flight == 0


class HeldClassifier:
    """Names each message's intent after the message; each call waits until the test lets it go."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = threading.Event()

    def predict(self, texts: Sequence[str], vectors: np.ndarray) -> list[Prediction]:
        self.calls.append(list(texts))
        if not self.release.wait(timeout=10):
            raise RuntimeError("never released")
        if "fail" in texts:
            raise ValueError("the classifier failed")
        return [Prediction(text, float(vector[0]), text) for text, vector in zip(texts, vectors, strict=True)]


async def test_messages_that_arrive_while_the_classifier_runs_go_in_one_call() -> None:
    held = HeldClassifier()
    classifier = CoalescingClassifier(held)
    first = asyncio.create_task(classifier.predict("a", np.array([1.0, 0.0])))
    while not held.calls:
        await asyncio.sleep(0.001)
    others = [asyncio.create_task(classifier.predict(text, np.array([float(n), 0.0]))) for n, text in enumerate("bcd", 2)]
    await asyncio.sleep(0.01)
    held.release.set()
    assert (await first).intent == "a"
    assert [(p.intent, p.confidence) for p in await asyncio.gather(*others)] == [("b", 2.0), ("c", 3.0), ("d", 4.0)]
    assert held.calls == [["a"], ["b", "c", "d"]]
    with pytest.raises(ValueError, match="failed"):
        await classifier.predict("fail", np.array([0.0, 0.0]))
    assert (await classifier.predict("e", np.array([5.0, 0.0]))).intent == "e"  # a failed call leaves it working


def test_the_time_of_turns_that_failed_counts_towards_the_next_one_answered() -> None:
    clock = Clock()
    admission = TurnAdmission(max_wait_s=None, clock=clock)
    answered = admission.turn(None)
    answered.__enter__()
    for _ in range(3):  # three fail at their deadline, a second in: no faster than the work they left undone
        with pytest.raises(ValueError), admission.turn(None):
            clock.now += 1.0 / 3
            raise ValueError("deadline")
    assert admission.seconds_per_turn is None
    clock.now += 1.0
    answered.__exit__(None, None, None)
    assert admission.seconds_per_turn == pytest.approx(2.0)  # 2 s busy, one turn answered
    assert admission.in_flight == 0
