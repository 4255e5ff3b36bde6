"""Streams and quotas (issue 13, item 3), over real gRPC against a real nats-server.

A service process is started in-process the way every service starts (`llmos.service.ServiceProcess`:
the same interceptors, the same server options) with small limits from the environment. It serves the
real dialogue servicer, whose Converse runs the real voice pipeline (`VoiceTurns`) over a scripted
recognizer (an interim transcript per chunk of audio, so buffering can be driven exactly), and a
scripted speech service (StreamingRecognize, and a Recognize that holds until released).
A huge abstractive summary runs the real Summarizer with the real tokenizer and embedding model,
counting the Generate calls it makes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.auth import current_principal
from llmos.bus.broker import Bus
from llmos.models import artefact_dir
from llmos.service import GrpcBinding, ServiceDefinition, ServiceParts, ServiceProcess
from llmos.settings import PlatformSettings
from llmos.audio import EndpointConfig
from llmos.tokenization import ModelTokenizer
from llmos.v1 import dialogue_pb2, dialogue_pb2_grpc, speech_pb2, speech_pb2_grpc
from services.dialogue.backends import LocalEmbedder, LocalTokenCounter
from services.dialogue.servicer import DialogueServicer
from services.dialogue.summarize import Summarizer
from services.dialogue.voice import VoiceLimits, VoiceTurns
from tests.conftest import REPO, NatsServer, _settings_from, platform_environment
from tests.grpc_helpers import ACME_OPERATOR, ACME_USER, ADMIN, GLOBEX_USER
from tests.voice_helpers import InterimRecognizer

pytestmark = pytest.mark.security

PUSHBACK = "grpc-retry-pushback-ms"  # gRPC's standard retry hint (milliseconds, decimal)
ALICE, BOB, OLGA = ACME_USER, GLOBEX_USER, ACME_OPERATOR
KEYS = ("user-key-acme=alice:acme:user", "user-key-globex=bob:globex:user", "operator-key-acme=olga:acme:operator",
        "test-admin-key=tester:acme:admin")
RATE = 16000
SILENCE = bytes(RATE // 10 * 2)  # 100 ms of 16-bit silence: no barge-in, no turn
CONVERSE_CONFIG = dialogue_pb2.ConverseConfig(
    recognition=speech_pb2.StreamingRecognitionConfig(
        config=speech_pb2.RecognitionConfig(encoding=speech_pb2.AUDIO_ENCODING_LINEAR_PCM, sample_rate_hertz=RATE),
        interim_results=True,
    ),
)
RECOGNIZE_CONFIG = speech_pb2.StreamingRecognizeRequest(streaming_config=CONVERSE_CONFIG.recognition)


class ScriptedSpeech(speech_pb2_grpc.SpeechServiceServicer):
    """A speech service that answers each chunk of audio with an interim transcript, and holds each
    Recognize until released."""

    def __init__(self) -> None:
        self.holding: list[str] = []  # subjects of the Recognize calls being held
        self.release = asyncio.Event()

    async def StreamingRecognize(
        self, requests: AsyncIterator[speech_pb2.StreamingRecognizeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[speech_pb2.StreamingRecognizeResponse]:
        async for request in requests:
            if request.WhichOneof("streaming_request") == "audio_content":
                yield speech_pb2.StreamingRecognizeResponse(results=[speech_pb2.SpeechRecognitionResult(
                    alternatives=[speech_pb2.SpeechRecognitionAlternative(transcript="x")], is_final=False,
                )])

    async def Recognize(self, request: speech_pb2.RecognizeRequest, context: grpc.aio.ServicerContext) -> speech_pb2.RecognizeResponse:
        self.holding.append(current_principal().subject)
        await self.release.wait()
        return speech_pb2.RecognizeResponse()


class NoTurns:
    """Turn logic that is never reached: the scripted transcripts are all interim."""

    def chat(self, *args: Any) -> AsyncIterator[dialogue_pb2.ChatResponse]:
        raise AssertionError("no final transcript was sent, so no turn may start")


@asynccontextmanager
async def service(
    nats: NatsServer, tmp_path: Path, limits: dict[str, str], speech: ScriptedSpeech, recognizer: InterimRecognizer | None = None
) -> AsyncIterator[int]:
    """A service process (as `dialogue`) with these limits in its environment; yields its port."""
    env = {**platform_environment(nats, tmp_path), **limits, "LLMOS_API_KEYS": ",".join(KEYS)}
    settings = _settings_from(env)

    async def build(settings: PlatformSettings, bus: Bus) -> ServiceParts:
        # Converse never synthesizes here (no turn starts): the recognizer stands in for both.
        scripted = recognizer or InterimRecognizer("x" * 16)
        voice = VoiceTurns(NoTurns(), scripted, scripted, VoiceLimits(2, EndpointConfig(300, 0.6), 30.0))  # type: ignore[arg-type]
        return ServiceParts(grpc=[
            GrpcBinding.of(dialogue_pb2, "DialogueService", DialogueServicer(None, voice),  # type: ignore[arg-type]
                           dialogue_pb2_grpc.add_DialogueServiceServicer_to_server),
            GrpcBinding.of(speech_pb2, "SpeechService", speech, speech_pb2_grpc.add_SpeechServiceServicer_to_server),
        ])

    process = ServiceProcess(ServiceDefinition("dialogue", PlatformSettings, build), settings)
    await process.start()
    try:
        yield process.port
    finally:
        await process.stop()


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def recognize_call(channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]]) -> Awaitable[speech_pb2.RecognizeResponse]:
    return speech_pb2_grpc.SpeechServiceStub(channel).Recognize(speech_pb2.RecognizeRequest(), metadata=metadata, timeout=30)


def assert_refused_with_a_retry_hint(error: grpc.aio.AioRpcError, *words: str) -> None:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    trailing = dict(error.trailing_metadata() or ())
    assert PUSHBACK in trailing, trailing
    assert int(trailing[PUSHBACK]) >= 0
    for word in words:
        assert word in (error.details() or ""), error.details()


async def test_a_converse_client_that_never_reads_stops_being_read(nats_server: NatsServer, tmp_path: Path) -> None:
    """Every chunk of audio makes a 64 kB transcript; a client that sends 800 chunks and reads none of the
    answers must find the server no longer reading its audio after a bounded number (on the previous code
    the server read all 800 and queued 50 MB of answers for a reader that never came)."""
    chunks = 800
    recognizer = InterimRecognizer("x" * 64_000)
    async with service(nats_server, tmp_path, {}, ScriptedSpeech(), recognizer) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = dialogue_pb2_grpc.DialogueServiceStub(channel).Converse(metadata=ALICE, timeout=60)
        await call.write(dialogue_pb2.ConverseRequest(config=CONVERSE_CONFIG))

        async def speak() -> None:
            for _ in range(chunks):
                await call.write(dialogue_pb2.ConverseRequest(audio_content=SILENCE))

        speaking = asyncio.create_task(speak())
        await asyncio.wait([speaking], timeout=8.0)
        read_then = recognizer.chunks_read
        await asyncio.sleep(1.0)
        read_later = recognizer.chunks_read
        speaking.cancel()
        call.cancel()
    assert read_later < chunks // 2, f"the server read {read_later} of {chunks} chunks for a client that reads nothing"
    assert read_later == read_then, "the server kept reading audio while its answers went unread"


@pytest.mark.parametrize("method", ["Converse", "StreamingRecognize"])
async def test_a_stream_past_its_duration_limit_is_ended(nats_server: NatsServer, tmp_path: Path, method: str) -> None:
    speech = ScriptedSpeech()
    async with service(nats_server, tmp_path, {"LLMOS_MAX_STREAM_S": "1.5"}, speech) as port, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        if method == "Converse":
            call = dialogue_pb2_grpc.DialogueServiceStub(channel).Converse(metadata=ALICE, timeout=30)
            first, audio = dialogue_pb2.ConverseRequest(config=CONVERSE_CONFIG), dialogue_pb2.ConverseRequest(audio_content=SILENCE)
        else:
            call = speech_pb2_grpc.SpeechServiceStub(channel).StreamingRecognize(metadata=ALICE, timeout=30)
            first, audio = RECOGNIZE_CONFIG, speech_pb2.StreamingRecognizeRequest(audio_content=SILENCE)
        started = time.monotonic()

        async def speak() -> None:
            await call.write(first)
            for _ in range(50):  # 5 s of audio in real time
                await call.write(audio)
                await asyncio.sleep(0.1)
            await call.done_writing()

        speaking = asyncio.create_task(speak())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in call:
                pass
        elapsed = time.monotonic() - started
        speaking.cancel()
    assert_refused_with_a_retry_hint(error.value, "1.5 s")
    assert 1.4 < elapsed < 4.0


async def test_a_principal_over_its_concurrency_quota_is_refused_while_another_is_served(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    speech = ScriptedSpeech()
    limits = {"LLMOS_PRINCIPAL_MAX_CALLS": "2", "LLMOS_PRINCIPAL_MAX_STREAMS": "1", "LLMOS_QUOTA_RETRY_AFTER_S": "0.5"}
    async with service(nats_server, tmp_path, limits, speech) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        held = [asyncio.ensure_future(recognize_call(channel, ALICE)) for _ in range(2)]
        await eventually(lambda: speech.holding.count("alice") == 2)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await recognize_call(channel, ALICE)
        assert_refused_with_a_retry_hint(error.value, "2 calls")
        assert dict(error.value.trailing_metadata())[PUSHBACK] == "500"
        bobs = asyncio.ensure_future(recognize_call(channel, BOB))
        await eventually(lambda: "bob" in speech.holding)
        speech.release.set()
        assert all(isinstance(response, speech_pb2.RecognizeResponse) for response in await asyncio.gather(*held, bobs))
        await recognize_call(channel, ALICE)  # her quota is free again once her calls end

        # One open stream per principal: Alice's second is refused, Bob's is served.
        stub = speech_pb2_grpc.SpeechServiceStub(channel)
        alices_stream = stub.StreamingRecognize(metadata=ALICE, timeout=30)
        await alices_stream.write(RECOGNIZE_CONFIG)
        await alices_stream.write(speech_pb2.StreamingRecognizeRequest(audio_content=SILENCE))
        await alices_stream.read()
        second = stub.StreamingRecognize(metadata=ALICE, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await second.read()
        assert_refused_with_a_retry_hint(error.value, "1 stream")
        bobs_stream = stub.StreamingRecognize(metadata=BOB, timeout=30)
        await bobs_stream.write(RECOGNIZE_CONFIG)
        await bobs_stream.write(speech_pb2.StreamingRecognizeRequest(audio_content=SILENCE))
        assert (await bobs_stream.read()).results
        for stream in (alices_stream, bobs_stream):
            await stream.done_writing()
            while await stream.read() != grpc.aio.EOF:
                pass


async def test_every_server_limits_its_concurrent_calls(nats_server: NatsServer, tmp_path: Path) -> None:
    """Three calls in flight fill a server limited to three: a fourth principal is refused with a retry
    hint, while health probes still answer; past a small margin, gRPC's own limit refuses even those."""
    speech = ScriptedSpeech()
    async with service(nats_server, tmp_path, {"LLMOS_MAX_CONCURRENT_RPCS": "3"}, speech) as port, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        held = [asyncio.ensure_future(recognize_call(channel, key)) for key in (ALICE, BOB, OLGA)]
        await eventually(lambda: len(speech.holding) == 3)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await recognize_call(channel, ADMIN)
        assert_refused_with_a_retry_hint(error.value, "3 calls")
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == health_pb2.HealthCheckResponse.SERVING

        watches = []
        refused: grpc.aio.AioRpcError | None = None
        for _ in range(64):
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
            await watch.read()
            watches.append(watch)
            try:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                refused = exc
                break
        for watch in watches:
            watch.cancel()
        speech.release.set()
        await asyncio.gather(*held)
    assert refused is not None, "no limit on concurrent calls: 64 open streams and health still answered"
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


class CountingGenerator:
    """Stands in for the inference service: counts Generate calls, answers with the first sentence given."""

    def __init__(self) -> None:
        self.calls = 0

    async def stream(self, messages: Sequence[tuple[str, str]], max_new_tokens: int, timeout_s: float) -> AsyncIterator[str]:
        self.calls += 1
        text = messages[-1][1].split("\n\n", 1)[-1]
        yield text.split(". ")[0][:200] + "."


def huge_document() -> str:
    """About 400,000 characters (the longest Summarize accepts) of the demo help centre, repeated."""
    articles = "\n\n".join(path.read_text() for path in sorted((REPO / "demo" / "kb").glob("*.md")))
    copies = []
    while sum(map(len, copies)) < 399_000:
        copies.append(articles.replace("\n\n", f" (copy {len(copies)})\n\n"))
    return "\n\n".join(copies)[:399_000]


@pytest.fixture(scope="module")
def local_models(models_home: Path) -> Iterator[tuple[LocalEmbedder, LocalTokenCounter]]:
    tokenizer = ModelTokenizer.from_dir(artefact_dir(models_home, "smollm2-135m-instruct"))
    yield LocalEmbedder.from_dir(artefact_dir(models_home, "all-minilm-l6-v2")), LocalTokenCounter(tokenizer)


@pytest.mark.timeout(600)
async def test_a_huge_abstractive_summary_makes_a_bounded_number_of_generate_calls(local_models) -> None:  # type: ignore[no-untyped-def]
    embedder, tokens = local_models
    generator = CountingGenerator()
    text = huge_document()
    summarizer = Summarizer(embedder, generator, tokens, context_tokens=2048, min_support=0.8, max_generate_calls=8)
    summary = await summarizer.abstractive(text, 60, 300.0)
    assert summary.source_tokens > 50_000
    # 54 calls on the previous code (105,311 source tokens in parts of 1,872).
    assert generator.calls <= 8, f"{generator.calls} Generate calls for one summary"
    assert summary.map_steps == generator.calls > 1  # still map-reduced
    assert 0 < len(summary.text.split()) <= 60
