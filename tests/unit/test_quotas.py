"""Quota logic in one process (issue 13, item 3): the counts behind the gRPC quota interceptors and the
interceptors on an in-process server, the retry trailer, the bounded fan-out and priority of abstractive
summaries, and Converse's bounded response queue."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmos import errors
from llmos.audio import EndpointConfig
from llmos.auth import Principal
from llmos.grpcutil.interceptors import ServerInterceptor
from llmos.grpcutil.quotas import PROBE_HEADROOM, QuotaLimits, Quotas, quota_interceptors, stream_too_long
from llmos.grpcutil.status import RETRY_AFTER_MS_KEY, status_for, trailing_metadata_for
from llmos.audit import AuditLog
from llmos.crypto import AtRest
from llmos.testing import MemoryBucket, MemoryPublisher
from llmos.v1 import common_pb2, dialogue_pb2, speech_pb2
from services.dialogue.backends import Backends, GrpcGenerator
from services.dialogue.core import DialogueCore
from services.dialogue.sessions import SessionStore
from services.dialogue.slots import OrderBook
from services.dialogue.summarize import Summarizer, pack
from services.dialogue.voice import AUDIO_QUEUE_CHUNKS, EVENT_QUEUE_SIZE, VoiceLimits, VoiceTurns
from tests.unit.test_dialogue import ASSISTANT, LIMITS as DIALOGUE_LIMITS, FixedRetriever, HashEmbedder, KeywordClassifier, ScriptedGenerator, WordCounter
from tests.voice_helpers import InterimRecognizer

pytestmark = pytest.mark.unit

LIMITS = QuotaLimits(max_concurrent_rpcs=3, principal_max_calls=2, principal_max_streams=1, max_stream_s=60.0, retry_after_s=0.25)
ALICE = Principal("alice", "acme", frozenset({"user"}))
ALICE_OF_GLOBEX = Principal("alice", "globex", frozenset({"user"}))
BUS_HANDLER = Principal("bus:llmos.docs.indexed", "acme", frozenset({"service"}))
METHOD = "/llmos.v1.SpeechService/StreamingRecognize"


def test_the_retry_hint_is_grpcs_pushback_trailer_in_milliseconds() -> None:
    assert RETRY_AFTER_MS_KEY == "grpc-retry-pushback-ms"
    error = errors.ResourceExhausted("full", 0.25)
    assert status_for(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailing_metadata_for(error) == (("grpc-retry-pushback-ms", "250"),)
    assert trailing_metadata_for(errors.ResourceExhausted("full", 0.0)) == (("grpc-retry-pushback-ms", "0"),)
    assert trailing_metadata_for(errors.NotFound("gone")) == ()


def test_a_principal_gets_its_calls_and_streams_then_is_refused_until_one_ends() -> None:
    quotas = Quotas(LIMITS)
    stream = quotas.admit_principal_call(ALICE, METHOD, stream=True)
    with pytest.raises(errors.ResourceExhausted) as refused:
        quotas.admit_principal_call(ALICE, METHOD, stream=True)
    assert "already has 1 stream open" in refused.value.message and refused.value.retry_after_s == 0.25
    call = quotas.admit_principal_call(ALICE, METHOD, stream=False)
    with pytest.raises(errors.ResourceExhausted, match="already has 2 calls in flight"):
        quotas.admit_principal_call(ALICE, METHOD, stream=False)
    # The same subject in another tenant is another principal.
    quotas.admit_principal_call(ALICE_OF_GLOBEX, METHOD, stream=True)
    assert quotas.in_flight(ALICE) == (2, 1)
    stream()
    stream()  # a call's end is reported twice (its handler and gRPC's done callback): counted once
    assert quotas.in_flight(ALICE) == (1, 0)
    quotas.admit_principal_call(ALICE, METHOD, stream=True)
    call()
    assert quotas.in_flight(ALICE) == (1, 1)


def test_a_service_acting_on_a_bus_event_is_held_by_the_server_limit_only() -> None:
    quotas = Quotas(LIMITS)
    for _ in range(10):
        quotas.admit_principal_call(BUS_HANDLER, METHOD, stream=True)
    assert quotas.in_flight(BUS_HANDLER) == (0, 0)


def test_the_server_limit_counts_every_call_and_leaves_room_for_probes_in_grpcs_own() -> None:
    quotas = Quotas(LIMITS)
    releases = [quotas.admit_server_call(METHOD) for _ in range(3)]
    with pytest.raises(errors.ResourceExhausted, match="its limit of 3 calls at once"):
        quotas.admit_server_call(METHOD)
    releases[0]()
    releases[0]()
    quotas.admit_server_call(METHOD)
    with pytest.raises(errors.ResourceExhausted):
        quotas.admit_server_call(METHOD)
    assert LIMITS.grpc_maximum_concurrent_rpcs == 3 + PROBE_HEADROOM


def test_a_stream_past_its_duration_may_start_again_at_once() -> None:
    error = stream_too_long(METHOD, 1.5)
    assert "1.5 s limit" in error.message and "open a new stream" in error.message
    assert error.retry_after_s == 0.0


# --- abstractive summaries ----------------------------------------------------------------------


def distinct_text(sentences: int, seed: int = 7) -> str:
    """Sentences of random words, unlike one another (nothing for the selection to drop as a repeat)."""
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(5000)]
    return " ".join(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(sentences))


class CountingGenerator(ScriptedGenerator):
    def __init__(self) -> None:
        super().__init__("a short summary of this part with some words.")


@pytest.mark.parametrize("max_calls", [1, 2, 3, 5, 8])
async def test_an_abstractive_summary_makes_at_most_its_generate_calls(max_calls: int) -> None:
    generator = CountingGenerator()
    summarizer = Summarizer(HashEmbedder(), generator, WordCounter(), context_tokens=300, min_support=0.8, max_generate_calls=max_calls)
    text = distinct_text(600)  # about 6,000 tokens: 35 parts of this context
    summary = await summarizer.abstractive(text, 20, 5.0)
    assert len(generator.calls) <= max_calls
    assert summary.map_steps == len(generator.calls)
    if max_calls >= 3:
        assert len(generator.calls) >= 3  # map-reduced, not cut down to one call
    budget = 300 - (int(20 * 1.6) + 16) - 64
    for call in generator.calls:
        assert len(call[-1][1].split()) - 13 <= budget  # every prompt's text fits the context


def test_the_unlimited_summary_would_fan_out() -> None:
    """The text above needs far more parts than any limit tested (so the bound is what holds the calls)."""
    sentences = distinct_text(600).split(". ")
    assert len(pack(sentences, [len(s.split()) for s in sentences], 300 - 48 - 64)) > 30


@given(st.lists(st.integers(1, 40), min_size=1, max_size=300), st.integers(100, 400), st.integers(1, 12))
def test_short_sentences_within_the_condensed_total_pack_into_the_parts_allowed(counts: list[int], budget: int, parts: int) -> None:
    longest = max(counts)
    kept, total = [], 0
    for count in counts:  # a selection within parts * (budget - longest) tokens, as the summarizer makes
        if total + count <= parts * (budget - longest):
            kept.append(count)
            total += count
    packed = pack([f"s{i}" for i in range(len(kept))], kept, budget)
    assert len(packed) <= max(parts, 1 if kept else 0)


class RecordingInference:
    """The inference client's streamed generation, recording the priority of each call."""

    def __init__(self) -> None:
        self.priorities: list[int] = []

    async def generate_stream(
        self, messages: object, max_new_tokens: int, timeout_s: float | None, priority: int
    ) -> AsyncIterator[str]:
        self.priorities.append(priority)
        yield "Returns are free within 30 days."


async def test_summaries_generate_below_chat_in_the_inference_schedulers_order() -> None:
    chat, summaries = RecordingInference(), RecordingInference()
    bus = MemoryPublisher()
    core = DialogueCore(
        bus,
        SessionStore(MemoryBucket(), idle_ttl_s=3600, at_rest=AtRest(None, "sessions")),
        AuditLog(bus, "dialogue"),
        KeywordClassifier(),  # type: ignore[arg-type]
        Backends(HashEmbedder(), FixedRetriever([]), GrpcGenerator(chat), WordCounter(),  # type: ignore[arg-type]
                 summary_generator=GrpcGenerator(summaries, common_pb2.PRIORITY_STANDARD)),  # type: ignore[arg-type]
        OrderBook([]),
        DIALOGUE_LIMITS,
        ASSISTANT,
    )
    request = dialogue_pb2.SummarizeRequest(
        text="Returns are free within 30 days. Refunds take five days.", mode=dialogue_pb2.SUMMARY_MODE_ABSTRACTIVE
    )
    await core.summarize("acme", request, None)
    assert summaries.priorities == [common_pb2.PRIORITY_STANDARD] and chat.priorities == []


# --- Converse's responses ------------------------------------------------------------------------


class FailingRecognizer(InterimRecognizer):
    async def recognize_stream(
        self, config: speech_pb2.StreamingRecognitionConfig, audio: AsyncIterator[bytes], timeout_s: float | None
    ) -> AsyncIterator[speech_pb2.SpeechRecognitionResult]:
        async for result in super().recognize_stream(config, audio, timeout_s):
            yield result
            if self.chunks_read == 3:
                raise errors.Unavailable("speech: gone")


CONFIG = dialogue_pb2.ConverseConfig(recognition=speech_pb2.StreamingRecognitionConfig(
    config=speech_pb2.RecognitionConfig(encoding=speech_pb2.AUDIO_ENCODING_LINEAR_PCM, sample_rate_hertz=16000),
    interim_results=True,
))
SILENCE = bytes(3200)


def voice(recognizer: InterimRecognizer) -> VoiceTurns:
    return VoiceTurns(None, recognizer, None, VoiceLimits(2, EndpointConfig(300, 0.6), 10.0))  # type: ignore[arg-type]


async def test_a_caller_that_does_not_read_is_not_read_either() -> None:
    recognizer = InterimRecognizer()
    sent = 0

    async def audio() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(10_000):
            sent += 1
            yield SILENCE

    responses = voice(recognizer).converse(ALICE, "acme", CONFIG, audio(), None)
    first = await anext(responses)  # the call is running; the caller reads no more
    await asyncio.sleep(0.5)
    assert first.transcript.alternatives[0].transcript == "uh"
    # Read ahead: the queued responses, the recognizer's one in hand, the audio queue, the pump's chunk.
    assert recognizer.chunks_read <= EVENT_QUEUE_SIZE + 2
    assert sent <= recognizer.chunks_read + AUDIO_QUEUE_CHUNKS + 2
    await responses.aclose()


async def test_responses_made_before_a_failure_arrive_before_it() -> None:
    async def audio() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield SILENCE

    received: list[dialogue_pb2.ConverseResponse] = []
    with pytest.raises(errors.Unavailable, match="speech: gone"):
        async for response in voice(FailingRecognizer()).converse(ALICE, "acme", CONFIG, audio(), None):
            received.append(response)
    assert len(received) == 3


async def test_a_conversation_ends_after_its_last_response() -> None:
    async def audio() -> AsyncIterator[bytes]:
        for _ in range(EVENT_QUEUE_SIZE * 3):
            yield SILENCE

    received = [response async for response in voice(InterimRecognizer()).converse(ALICE, "acme", CONFIG, audio(), None)]
    assert len(received) == EVENT_QUEUE_SIZE * 3


# --- the interceptors on an in-process server -------------------------------------------------------


class AllowAlice:
    async def authenticate(self, authorization: str | None) -> Principal:
        return ALICE


async def _forever(requests: AsyncIterator[bytes]) -> None:
    async for _ in requests:
        pass
    await asyncio.Event().wait()  # the client finished writing; the handler still holds the stream


async def read_forever(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    await _forever(requests)
    return b""


async def answer_nothing(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    await _forever(requests)
    yield b""


@pytest.mark.parametrize("shape", ["stream_unary", "stream_stream"])
async def test_a_client_stream_is_ended_at_its_duration_with_a_retry_hint(shape: str) -> None:
    limits = QuotaLimits(max_concurrent_rpcs=8, principal_max_calls=8, principal_max_streams=8, max_stream_s=0.3, retry_after_s=1.0)
    first, last = quota_interceptors(limits)
    server = grpc.aio.server(interceptors=[first, ServerInterceptor("speech", AllowAlice()), last])
    handler = (grpc.stream_unary_rpc_method_handler(read_forever) if shape == "stream_unary"
               else grpc.stream_stream_rpc_method_handler(answer_nothing))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("llmos.v1.SpeechService", {"StreamingRecognize": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = getattr(channel, shape)(METHOD)

            async def requests() -> AsyncIterator[bytes]:
                for _ in range(100):
                    yield b"audio"
                    await asyncio.sleep(0.05)

            loop = asyncio.get_running_loop()
            started = loop.time()
            call = method(requests(), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                if shape == "stream_unary":
                    await call
                else:
                    async for _ in call:
                        pass
            elapsed = loop.time() - started
    finally:
        await server.stop(0)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "0.3 s limit" in (error.value.details() or "")
    assert dict(error.value.trailing_metadata() or ())[RETRY_AFTER_MS_KEY] == "0"
    assert 0.3 <= elapsed < 3.0
