"""Admission that knows the expected wait: the estimate, the refusal, and a chat turn passing it on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import pytest

from llmos.deadline import Deadline
from llmos.errors import ResourceExhausted
from llmos.v1 import common_pb2
from services.inference.scheduler import (
    BATCH_RANK,
    INTERACTIVE_RANK,
    AdmissionLimits,
    GenerationRequest,
    GenerationScheduler,
    PrefixCache,
    QueuedWork,
    SamplingConfig,
    WaitEstimator,
)
from tests.unit.test_dialogue import RETURNS, make_core, turn
from tests.unit.test_inference_scheduler import CountingDecoder, word_tokenizer

pytestmark = pytest.mark.unit

STANDARD_RANK = 1


def measured(step_s: float, batch: int, prefill_tps: float) -> WaitEstimator:
    estimator = WaitEstimator()
    estimator.observe_step(batch, step_s)
    estimator.observe_prefill(int(prefill_tps), 1.0)
    return estimator


# --- the estimate ----------------------------------------------------------------------------


def test_an_empty_scheduler_has_no_wait() -> None:
    assert measured(0.1, 2, 1000).expected_wait([], [], slots=2) == 0.0


def test_the_wait_is_the_first_free_slot_after_the_work_ahead_plus_its_prefill() -> None:
    estimator = measured(0.1, 2, 1000)
    # Two running, 6 tokens left each (nothing finished yet: their whole max_new_tokens expected).
    running = [QueuedWork(0, 4, 10, STANDARD_RANK), QueuedWork(0, 4, 10, STANDARD_RANK)]
    # One ahead takes the first slot freed (0.6 s) and holds it 10 steps; the new one gets the other.
    ahead = [QueuedWork(100, 0, 10, STANDARD_RANK)]
    assert estimator.expected_wait(running, ahead, slots=2) == pytest.approx(0.6 + 100 / 1000)
    # Two ahead: the second takes the other 0.6 s slot; the new one waits for the first of them (1.6 s).
    two_ahead = ahead * 2
    assert estimator.expected_wait(running, two_ahead, slots=2) == pytest.approx(1.6 + 200 / 1000)


def test_what_finished_requests_generated_replaces_their_limit() -> None:
    estimator = measured(0.1, 1, 1000)
    running = [QueuedWork(0, 2, 100, STANDARD_RANK)]
    assert estimator.expected_wait(running, [], slots=1) == pytest.approx(9.8)
    estimator.observe_finish(STANDARD_RANK, 12)
    assert estimator.expected_wait(running, [], slots=1) == pytest.approx(1.0)
    # Past its expected length a sequence is expected to end within a step.
    assert estimator.tokens_left(QueuedWork(0, 50, 100, STANDARD_RANK)) == 1.0
    # Another class keeps its own figure.
    assert estimator.tokens_left(QueuedWork(0, 0, 100, BATCH_RANK)) == 100.0


def test_rates_are_smoothed_and_the_step_time_follows_the_batch_size() -> None:
    estimator = WaitEstimator(smoothing=0.5)
    estimator.observe_step(2, 0.010)
    assert estimator.step_s(1) == pytest.approx(0.010)  # below every size measured: the smallest
    assert estimator.step_s(8) == pytest.approx(0.040)  # above: in proportion to the rows
    estimator.observe_step(8, 0.040)
    estimator.observe_step(8, 0.020)
    assert estimator.step_s(8) == pytest.approx(0.030)
    assert estimator.step_s(2) == pytest.approx(0.010)
    assert estimator.step_s(5) == pytest.approx(0.020)  # between two sizes: interpolated
    estimator.observe_admission(100, 75)  # a quarter of the prompt had to be prefilled
    assert estimator.uncached_share == pytest.approx(0.625)
    before = estimator.prefill_tps
    estimator.observe_prefill(500, 0.25)
    assert estimator.prefill_tps == pytest.approx((before + 2000) / 2)


def test_cached_prompt_share_scales_the_prefill_ahead() -> None:
    estimator = measured(0.1, 1, 1000)
    ahead = [QueuedWork(1000, 0, 1, STANDARD_RANK)]
    assert estimator.expected_wait([], ahead, slots=2) == pytest.approx(1.0)
    for _ in range(60):
        estimator.observe_admission(1000, 900)
    assert estimator.expected_wait([], ahead, slots=2) == pytest.approx(0.1, rel=0.01)


# --- the refusal -----------------------------------------------------------------------------


def engine(decoder: CountingDecoder, limits: AdmissionLimits, reserved: int = 0) -> GenerationScheduler:
    return GenerationScheduler(decoder, word_tokenizer(), 16, reserved, PrefixCache(0, 32), limits)  # type: ignore[arg-type]


def chat(prompt: list[int], max_new: int, deadline: Deadline | None = None,
         priority: int = common_pb2.PRIORITY_INTERACTIVE) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingConfig(max_new), "t", priority, deadline)


async def first_event(scheduler: GenerationScheduler, request: GenerationRequest) -> AsyncIterator[object]:
    stream = scheduler.submit(request)
    await anext(stream)
    return stream


async def test_a_request_expected_to_wait_past_the_longest_wait_is_refused_at_once() -> None:
    # One slot, 50 ms a step: a running 40-token generation holds it for about 2 s.
    scheduler = engine(CountingDecoder(1, step_s=0.05), AdmissionLimits(interactive_max_wait_s=0.5))
    scheduler.start()
    running = await first_event(scheduler, chat([1], 40))
    await asyncio.sleep(0.2)  # a few steps measured
    started = time.monotonic()
    with pytest.raises(ResourceExhausted) as refused:
        await anext(scheduler.submit(chat([2], 5)))
    assert time.monotonic() - started < 0.1
    assert "would wait about" in refused.value.message and "longest wait allowed (0.5 s)" in refused.value.message
    # The hint: when the wait will have come down to what is allowed.
    assert 0.5 < refused.value.retry_after_s < 2.5
    assert scheduler.waiting == 0  # nothing was queued
    await running.aclose()  # type: ignore[attr-defined]
    await scheduler.stop()


async def test_a_request_expected_to_wait_past_its_deadline_is_refused_and_one_that_fits_is_served() -> None:
    scheduler = engine(CountingDecoder(1, step_s=0.02), AdmissionLimits())
    scheduler.start()
    running = await first_event(scheduler, chat([1], 25))  # about 0.5 s left
    await asyncio.sleep(0.1)
    with pytest.raises(ResourceExhausted) as refused:
        await anext(scheduler.submit(chat([2], 3, Deadline.after(0.1))))
    assert "after its deadline" in refused.value.message
    served = [event async for event in scheduler.submit(chat([3], 3, Deadline.after(10.0)))]
    assert served[-1].usage is not None and served[-1].usage.generated_tokens == 3
    await running.aclose()  # type: ignore[attr-defined]
    await scheduler.stop()


async def test_a_request_that_would_get_its_slot_in_time_but_finish_late_is_refused() -> None:
    scheduler = engine(CountingDecoder(1, step_s=0.02), AdmissionLimits())
    scheduler.start()
    running = await first_event(scheduler, chat([1], 15))  # its slot frees in about 0.3 s
    await asyncio.sleep(0.1)
    assert scheduler.expected_wait_s(INTERACTIVE_RANK) < 1.0
    with pytest.raises(ResourceExhausted) as refused:  # 100 tokens at 20 ms: 2 s more
        await anext(scheduler.submit(chat([2], 100, Deadline.after(1.0))))
    assert "finish in about" in refused.value.message
    assert refused.value.retry_after_s > 1.0
    await running.aclose()  # type: ignore[attr-defined]
    await scheduler.stop()


async def test_an_idle_scheduler_never_refuses_even_a_short_deadline() -> None:
    scheduler = engine(CountingDecoder(2, step_s=0.001), AdmissionLimits(interactive_max_wait_s=0.001))
    scheduler.start()
    events = [event async for event in scheduler.submit(chat([1], 3, Deadline.after(0.05)))]
    assert events[-1].usage is not None and events[-1].usage.generated_tokens == 3
    await scheduler.stop()


async def test_running_batch_work_does_not_make_a_chat_wait() -> None:
    # Batch work is parked for a chat, so it is not counted against the chat's wait.
    scheduler = engine(CountingDecoder(1, step_s=0.05), AdmissionLimits(interactive_max_wait_s=0.3))
    scheduler.start()
    bulk = await first_event(scheduler, chat([1], 40, priority=common_pb2.PRIORITY_BATCH))
    await asyncio.sleep(0.2)
    assert scheduler.expected_wait_s(INTERACTIVE_RANK) == 0.0
    events = [event async for event in scheduler.submit(chat([2], 2))]
    assert events[-1].usage is not None and events[-1].usage.generated_tokens == 2
    assert scheduler.expected_wait_s(BATCH_RANK) > 0.3
    await bulk.aclose()  # type: ignore[attr-defined]
    await scheduler.stop()


# --- the chat turn ---------------------------------------------------------------------------


class RefusingGenerator:
    """Inference at capacity: refuses every generation with a retry hint, recording the timeout it got."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    async def stream(self, messages: Sequence[tuple[str, str]], max_new_tokens: int, timeout_s: float) -> AsyncIterator[str]:
        self.timeouts.append(timeout_s)
        raise ResourceExhausted("inference: the generation service is at capacity", retry_after_s=3.5)
        yield ""  # an async generator, like the real stream


async def test_a_chat_turn_passes_its_deadline_down_and_the_refusal_with_its_hint_up() -> None:
    generator = RefusingGenerator()
    core, _, _ = make_core(generator, [RETURNS])  # type: ignore[arg-type]
    with pytest.raises(ResourceExhausted) as refused:
        await turn(core, "can I return boots?", deadline=Deadline.after(2.0))
    assert refused.value.retry_after_s == 3.5
    (timeout_s,) = generator.timeouts
    assert 0 < timeout_s <= 2.0
