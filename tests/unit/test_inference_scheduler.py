"""The continuous-batching scheduler over a fake decoder: order, fairness, finishes, cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from llmos.deadline import Deadline
from llmos.tokenization import ModelTokenizer
from llmos.v1 import common_pb2
from services.inference.decoder import CachedPrefix, DecoderConfig
from services.inference.scheduler import (
    FinishReason,
    GenerationRequest,
    GenerationScheduler,
    PrefixCache,
    SamplingConfig,
    StreamEvent,
)

pytestmark = pytest.mark.unit

VOCAB = 50  # id 0 is the end-of-sequence token, ids 1..49 are the words w1..w49


class CountingDecoder:
    """Predicts "previous token + 1" (w49 is followed by end-of-sequence); records what it ran.

    It keeps each slot's tokens as its "KV cache" and predicts a step from the cache (the token
    before the new one, plus 2), so a cache that a move, a park or a resume got wrong changes the
    text. Like the real cache, a step writes at the row's length even for a row being prefilled,
    and the next prefill piece overwrites it.
    """

    def __init__(self, max_batch: int, step_s: float = 0.001, prefill_s: float = 0.0) -> None:
        self.config = DecoderConfig(1, 1, 4, VOCAB, 1024, (0,))
        self.max_batch = max_batch
        self.max_context = 1024
        self.step_s = step_s
        self.prefill_s = prefill_s
        self.log: list[str] = []  # "prefill <tokens>" and "decode <rows>", in order
        self.prefilled: list[list[int]] = []
        self.batch_sizes: list[int] = []
        self.rows: list[list[int]] = [[] for _ in range(max_batch)]

    def _logits(self, token: int) -> np.ndarray:
        logits = np.zeros(VOCAB, dtype=np.float32)
        logits[(token + 1) % VOCAB] = 1.0
        return logits

    def prefill(self, row: int, token_ids: Sequence[int], cached: int = 0) -> np.ndarray:
        self.prefilled.append(list(token_ids))
        self.log.append(f"prefill {len(token_ids) - cached}")
        self.rows[row] = [*self.rows[row][:cached], *token_ids[cached:]]
        time.sleep(self.prefill_s)
        return self._logits(int(token_ids[-1]))

    def decode(self, token_ids: Sequence[int], lengths: Sequence[int]) -> np.ndarray:
        self.batch_sizes.append(len(token_ids))
        self.log.append(f"decode {len(token_ids)}")
        for row, (token, length) in enumerate(zip(token_ids, lengths, strict=True)):
            assert len(self.rows[row]) == length, (row, self.rows[row], length)
            self.rows[row] = [*self.rows[row], int(token)]
        time.sleep(self.step_s)
        return np.stack([self._logits(self.rows[row][-2] + 1) for row in range(len(token_ids))])

    def move_row(self, source: int, target: int, length: int) -> None:
        self.rows[target] = self.rows[source][:length]

    def save_prefix(self, row: int, token_ids: Sequence[int]) -> CachedPrefix:
        assert self.rows[row][: len(token_ids)] == list(token_ids)
        empty = np.zeros((1, 1, len(token_ids), 4), np.float32)
        return CachedPrefix(np.asarray(token_ids), empty, empty)

    def load_prefix(self, row: int, prefix: CachedPrefix, length: int) -> None:
        self.rows[row] = [int(token) for token in prefix.token_ids[:length]]


def word_tokenizer() -> ModelTokenizer:
    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<eos>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return ModelTokenizer(tokenizer, "", {"eos_token": "<eos>"})


def scheduler(decoder: CountingDecoder, reserved: int = 0, queue: int = 16) -> GenerationScheduler:
    return GenerationScheduler(decoder, word_tokenizer(), queue, reserved, PrefixCache(0, 32))  # type: ignore[arg-type]


async def run(engine: GenerationScheduler, prompt: list[int], max_new: int = 10, stop: tuple[str, ...] = (),
              tenant: str = "t", priority: int = common_pb2.PRIORITY_STANDARD) -> list[StreamEvent]:
    request = GenerationRequest(prompt, SamplingConfig(max_new, stop=stop), tenant, priority)
    return [event async for event in engine.submit(request)]


async def test_tokens_stream_then_stop_at_end_of_sequence_or_length() -> None:
    engine = scheduler(CountingDecoder(4))
    engine.start()
    events = await run(engine, [45])
    assert [t for e in events for t in e.token_ids] == [46, 47, 48, 49]
    assert "".join(e.delta for e in events) == "w46 w47 w48 w49"
    assert events[-1].finish is FinishReason.STOP and all(e.finish is None for e in events[:-1])
    usage = events[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.generated_tokens) == (1, 4)
    limited = await run(engine, [10], max_new=3)
    assert limited[-1].finish is FinishReason.LENGTH and "".join(e.delta for e in limited) == "w11 w12 w13"
    await engine.stop()


async def test_generation_stops_before_a_stop_string_without_leaking_it() -> None:
    engine = scheduler(CountingDecoder(4))
    engine.start()
    events = await run(engine, [10], stop=("w14",))
    assert "".join(e.delta for e in events) == "w11 w12 w13 "
    assert events[-1].finish is FinishReason.STOP
    await engine.stop()


async def test_batched_rows_sample_as_alone_and_the_step_profile_counts_what_ran() -> None:
    decoder = CountingDecoder(4)
    engine = scheduler(decoder)
    seeded = SamplingConfig(4, temperature=1.0, seed=7)
    # A sampled row between greedy rows: the greedy ones take one argmax over the batch, it its own draw.
    streams = [asyncio.ensure_future(run(engine, [20], max_new=4)),
               asyncio.ensure_future(engine_events(engine, GenerationRequest([10], seeded, "u", common_pb2.PRIORITY_STANDARD))),
               asyncio.ensure_future(run(engine, [30], max_new=4))]
    await asyncio.sleep(0.01)
    engine.start()
    greedy_a, sampled, greedy_b = await asyncio.gather(*streams)
    assert max(decoder.batch_sizes) == 3
    assert "".join(e.delta for e in greedy_a) == "w21 w22 w23 w24" and "".join(e.delta for e in greedy_b) == "w31 w32 w33 w34"
    engine_alone = scheduler(CountingDecoder(4))
    engine_alone.start()
    alone = await engine_events(engine_alone, GenerationRequest([10], seeded, "t", common_pb2.PRIORITY_STANDARD))
    assert [t for e in sampled for t in e.token_ids] == [t for e in alone for t in e.token_ids]
    profile = engine.profile()
    assert (profile.steps, profile.rows) == (len(decoder.batch_sizes), sum(decoder.batch_sizes))
    # The fake decoder sleeps 1 ms a step: the decode phase holds at least that, in wall time.
    assert profile.wall_s["decode"] >= 0.001 * profile.steps
    assert all(profile.wall_s[phase] > 0 for phase in ("admit", "sample", "deliver"))
    await engine.stop()
    await engine_alone.stop()


async def test_a_prompt_s_first_token_goes_out_before_the_next_prompt_is_read() -> None:
    decoder = CountingDecoder(3, prefill_s=0.1)
    engine = scheduler(decoder)
    arrived: dict[int, float] = {}

    async def first_token_time(prompt: int) -> None:
        async for _ in engine.submit(GenerationRequest([prompt], SamplingConfig(2), "t", common_pb2.PRIORITY_STANDARD)):
            arrived.setdefault(prompt, time.monotonic())

    streams = [asyncio.ensure_future(first_token_time(prompt)) for prompt in (1, 2, 3)]
    await asyncio.sleep(0.01)  # all three wait: one admission prefills them one after another
    engine.start()
    await asyncio.gather(*streams)
    first, _, last = sorted(arrived.values())
    assert last - first >= 0.15  # the first stream did not wait for the two prompts after its own
    await engine.stop()


async def engine_events(engine: GenerationScheduler, request: GenerationRequest) -> list[StreamEvent]:
    return [event async for event in engine.submit(request)]


async def test_priority_then_fair_share_decide_admission() -> None:
    decoder = CountingDecoder(2)
    engine = scheduler(decoder)
    # Queued before the scheduler runs, so one admission decision sees them all.
    streams = [
        asyncio.ensure_future(run(engine, [1], max_new=2, tenant="a")),
        asyncio.ensure_future(run(engine, [2], max_new=2, tenant="a")),
        asyncio.ensure_future(run(engine, [3], max_new=2, tenant="a")),
        asyncio.ensure_future(run(engine, [4], max_new=2, tenant="b")),
        asyncio.ensure_future(run(engine, [5], max_new=2, tenant="c", priority=common_pb2.PRIORITY_BATCH)),
        asyncio.ensure_future(run(engine, [6], max_new=2, tenant="a", priority=common_pb2.PRIORITY_INTERACTIVE)),
    ]
    await asyncio.sleep(0.01)
    engine.start()
    await asyncio.gather(*streams)
    order = [prompt[0] for prompt in decoder.prefilled]
    assert order[:2] == [6, 4]  # interactive first, then tenant b, which has nothing running
    assert order[-1] == 5  # batch last
    await engine.stop()


async def test_reserved_slots_are_kept_for_interactive_work() -> None:
    decoder = CountingDecoder(3)
    engine = scheduler(decoder, reserved=1)
    engine.start()
    await asyncio.gather(*(run(engine, [1], max_new=5, priority=common_pb2.PRIORITY_BATCH) for _ in range(4)))
    assert max(decoder.batch_sizes) == 2
    await engine.stop()


async def test_batch_work_cannot_starve_interactive_work() -> None:
    decoder = CountingDecoder(2, step_s=0.002)
    engine = scheduler(decoder)  # no reserved slot: only pre-emption can make room
    engine.start()
    flood = [
        asyncio.ensure_future(run(engine, [1], max_new=40, tenant="a", priority=common_pb2.PRIORITY_BATCH))
        for _ in range(5)
    ]
    while len(decoder.batch_sizes) < 3:  # both slots decode batch work
        await asyncio.sleep(0.001)
    steps_before = len(decoder.batch_sizes)
    chats = await asyncio.gather(*(
        run(engine, [10 * i], max_new=3, tenant="b", priority=common_pb2.PRIORITY_INTERACTIVE) for i in (1, 2)
    ))
    # Each chat needs 2 decode steps after its prefill; waiting for a batch stream would be ~38 more.
    assert len(decoder.batch_sizes) - steps_before <= 4
    assert ["".join(e.delta for e in events) for events in chats] == ["w11 w12 w13", "w21 w22 w23"]
    # The parked batch streams resumed where they stopped, with their own caches.
    expected = " ".join(f"w{i}" for i in range(2, 42))
    assert ["".join(e.delta for e in events) for events in await asyncio.gather(*flood)] == [expected] * 5
    await engine.stop()


async def test_a_long_batch_prompt_is_prefilled_between_steps_and_lets_a_chat_in() -> None:
    decoder = CountingDecoder(3, step_s=0.002, prefill_s=0.05)
    engine = scheduler(decoder)
    engine.start()
    streaming = asyncio.ensure_future(run(engine, [1], max_new=40))
    while not decoder.batch_sizes:
        await asyncio.sleep(0.001)
    long_prompt = [5] * 599 + [10]  # three prefill pieces
    bulk = asyncio.ensure_future(run(engine, long_prompt, max_new=3, priority=common_pb2.PRIORITY_BATCH))
    while "prefill 256" not in decoder.log:  # the chat arrives while the bulk prompt's first piece runs
        await asyncio.sleep(0.001)
    chat = await run(engine, [20], max_new=3, priority=common_pb2.PRIORITY_INTERACTIVE)
    assert "".join(e.delta for e in chat) == "w21 w22 w23"
    assert "".join(e.delta for e in await bulk) == "w11 w12 w13"
    assert "".join(e.delta for e in await streaming) == " ".join(f"w{i}" for i in range(2, 42))
    pieces = [i for i, entry in enumerate(decoder.log) if entry in ("prefill 256", "prefill 88")]
    assert len(pieces) == 3
    between = decoder.log[pieces[0]:pieces[-1]]
    assert "prefill 1" in between  # the chat went in before the bulk prompt's last piece
    assert sum(entry.startswith("decode") for entry in between) >= 2  # the running stream kept stepping
    await engine.stop()


async def test_a_deadline_passing_while_a_long_prompt_is_read_frees_its_slot() -> None:
    from llmos.errors import DeadlineExceeded

    decoder = CountingDecoder(2, step_s=0.002, prefill_s=0.05)
    engine = scheduler(decoder)
    engine.start()
    streaming = asyncio.ensure_future(run(engine, [1], max_new=40))
    while not decoder.batch_sizes:
        await asyncio.sleep(0.001)
    request = GenerationRequest([5] * 599 + [10], SamplingConfig(3), "t", common_pb2.PRIORITY_BATCH, deadline=Deadline.after(0.06))
    with pytest.raises(DeadlineExceeded, match="prompt was being read"):
        [event async for event in engine.submit(request)]
    assert "prefill 88" not in decoder.log  # it stopped before the last piece
    await streaming
    assert engine.running == 0
    await engine.stop()


async def test_a_stream_closed_early_frees_its_slot_at_once() -> None:
    decoder = CountingDecoder(1, step_s=0.01)
    engine = scheduler(decoder)
    engine.start()
    # Prompt w1 would generate 48 words; the caller leaves after the first.
    stream = engine.submit(GenerationRequest([1], SamplingConfig(100), "t", common_pb2.PRIORITY_STANDARD))
    await anext(stream)
    await stream.aclose()
    started = time.monotonic()
    events = await run(engine, [30], max_new=2)
    assert events[-1].finish is FinishReason.LENGTH
    assert time.monotonic() - started < 0.3  # not after the 47 remaining steps of the first
    await engine.stop()


async def test_a_full_class_queue_is_refused_and_shutdown_cancels_what_is_left() -> None:
    from llmos.errors import ResourceExhausted

    engine = scheduler(CountingDecoder(1), queue=1)  # not started: everything waits
    waiting = asyncio.ensure_future(run(engine, [1]))
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted):
        await run(engine, [2])
    await run_interactive_is_still_queued(engine)
    engine.start()
    await engine.stop()
    events = await waiting
    assert events[-1].finish in (FinishReason.CANCELLED, FinishReason.LENGTH)


async def run_interactive_is_still_queued(engine: GenerationScheduler) -> None:
    stream = engine.submit(GenerationRequest([3], SamplingConfig(1), "t", common_pb2.PRIORITY_INTERACTIVE))
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    assert engine.waiting == 2
    pending.cancel()
    await asyncio.gather(pending, return_exceptions=True)
    await stream.aclose()
