"""The speech service over gRPC, in-process against a real nats-server, real models, real recordings."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from llmos.audio import decode_clip, Encoding, encode_wav, resample
from llmos.bus.subjects import DOCS_INDEXED, SPEECH_RECOGNIZED, SPEECH_SYNTHESIZED, dead_letter_subject
from llmos.evaluation import WordErrors, word_errors
from llmos.clients import SpeechClient, transcript
from llmos.errors import FailedPrecondition, InvalidArgument
from llmos.service import ServiceProcess
from llmos.v1 import events_pb2, speech_pb2, speech_pb2_grpc
from services.speech.app import DEFINITION
from services.speech.settings import SpeechSettings
from tests.conftest import REPO, NatsServer, environment, platform_environment
from tests.fault_helpers import anon_rss_mb
from tests.grpc_helpers import ADMIN
from tests.integration.bus_helpers import last_message, last_sequence, messages_after

pytestmark = pytest.mark.integration

DATA = REPO.parent / "shared" / "data" / "speech"
LJ = DATA / "ljspeech_coqui-ai_TTS"
TENANT = "acme"  # the tenant of the ADMIN test key


def clip(path: Path) -> tuple[np.ndarray, int]:
    decoded = decode_clip(path.read_bytes(), Encoding.WAV, 0)
    return decoded.samples, decoded.sample_rate


def words(text: str) -> list[str]:
    return [w.strip(".,;:!?\"'").lower() for w in text.split() if w.strip(".,;:!?\"'")]


@pytest.fixture(scope="module")
def speech_settings(nats_server: NatsServer, models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpeechSettings]:
    home = tmp_path_factory.mktemp("speech-home")
    (home / "models").symlink_to(models_home / "models", target_is_directory=True)
    env = platform_environment(nats_server, home)
    env["LLMOS_SPEECH_DOMAIN_SEED"] = f"{TENANT}={REPO / 'demo' / 'kb'};{REPO / 'demo' / 'intents.yaml'}"
    with environment(env):
        yield SpeechSettings(_env_file=None)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
async def speech_addr(speech_settings: SpeechSettings) -> AsyncIterator[str]:
    process = ServiceProcess(DEFINITION, speech_settings)
    await process.start()
    try:
        yield f"127.0.0.1:{process.port}"
    finally:
        await process.stop()


@pytest.fixture(scope="module")
async def speech(speech_addr: str) -> AsyncIterator[SpeechClient]:
    async with grpc.aio.insecure_channel(speech_addr) as channel:
        yield SpeechClient(channel, ADMIN)


async def pcm_chunks(samples: np.ndarray, rate: int, chunk_ms: int = 100) -> AsyncIterator[bytes]:
    step = rate * chunk_ms // 1000
    for start in range(0, len(samples), step):
        yield samples[start:start + step].astype("<i2").tobytes()


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_recognize_a_recording_with_word_offsets_inside_the_clip(speech: SpeechClient, speech_settings: SpeechSettings) -> None:
    path = LJ / "LJ001-0001.wav"
    samples, rate = clip(path)
    before = await last_sequence(speech_settings.nats_url, SPEECH_RECOGNIZED)
    results = await speech.recognize(
        speech_pb2.RecognitionConfig(encoding=speech_pb2.AUDIO_ENCODING_WAV, enable_word_time_offsets=True, model="general"),
        path.read_bytes(),
    )
    heard = transcript(results)
    reference = "printing in the only sense with which we are at present concerned differs from most if not from all the arts and crafts represented in the exhibition"
    assert word_errors(words(reference), words(heard)).wer < 0.25
    duration_ms = len(samples) * 1000 // rate
    offsets = [(w.start_ms, w.end_ms) for r in results for w in r.alternatives[0].words]
    assert len(offsets) == len(words(heard))
    assert all(0 <= start <= end <= duration_ms for start, end in offsets)
    assert all(a[1] <= b[0] for a, b in zip(offsets, offsets[1:]))
    assert all(r.is_final and 0 < r.alternatives[0].confidence <= 1 for r in results)
    event = events_pb2.SpeechRecognized.FromString((await last_message(speech_settings.nats_url, SPEECH_RECOGNIZED, after_seq=before)).data)
    assert event.tenant == TENANT and event.transcript == results[-1].alternatives[0].transcript


async def test_streaming_gives_interims_then_a_final_per_utterance(speech: SpeechClient) -> None:
    first, rate = clip(LJ / "LJ001-0004.wav")
    second, rate2 = clip(LJ / "LJ001-0008.wav")
    assert rate == rate2
    pause = np.zeros(rate * 3 // 2, np.int16)
    audio = np.concatenate([first, pause, second, pause])
    config = speech_pb2.StreamingRecognitionConfig(
        config=speech_pb2.RecognitionConfig(
            encoding=speech_pb2.AUDIO_ENCODING_LINEAR_PCM, sample_rate_hertz=rate, enable_word_time_offsets=True, model="general"
        ),
        interim_results=True,
        endpointing=speech_pb2.EndpointingConfig(start_history_ms=240, stop_history_ms=600),
    )
    results = [r async for r in speech.recognize_stream(config, pcm_chunks(audio, rate), None)]
    finals = [r for r in results if r.is_final]
    assert len(finals) == 2
    first_final = results.index(finals[0])
    assert any(not r.is_final for r in results[:first_final]), "interim results come before the first final"
    assert any(not r.is_final for r in results[first_final + 1:]), "and before the second"
    assert all(0.0 <= r.stability <= 1.0 for r in results if not r.is_final)
    processed = [r.audio_processed_ms for r in results]
    assert processed == sorted(processed)
    assert "printed book" in finals[0].alternatives[0].transcript
    assert "surpassed" in finals[1].alternatives[0].transcript
    first_end_ms = len(first) * 1000 // rate
    second_start_ms = (len(first) + len(pause)) * 1000 // rate
    offsets = [(w.start_ms, w.end_ms) for f in finals for w in f.alternatives[0].words]
    assert all(a[1] <= b[0] for a, b in zip(offsets, offsets[1:]))
    assert finals[0].alternatives[0].words[-1].end_ms <= first_end_ms + 300
    assert finals[1].alternatives[0].words[0].start_ms >= second_start_ms - 300
    assert offsets[-1][1] <= len(audio) * 1000 // rate


def stereo_wav() -> bytes:
    mono = encode_wav(np.zeros(1600, np.int16), 16000)
    return mono[:22] + (2).to_bytes(2, "little") + mono[24:]


@pytest.mark.parametrize(
    ("audio", "encoding", "rate", "expected"),
    [
        (b"", speech_pb2.AUDIO_ENCODING_WAV, 0, "no audio"),
        (b"RIFX" + b"\x00" * 60, speech_pb2.AUDIO_ENCODING_WAV, 0, "RIFF/WAVE"),
        (stereo_wav(), speech_pb2.AUDIO_ENCODING_WAV, 0, "only mono"),
        (encode_wav(np.zeros(300, np.int16), 3000), speech_pb2.AUDIO_ENCODING_WAV, 0, "3000 Hz"),
        (np.zeros(300, np.int16).tobytes(), speech_pb2.AUDIO_ENCODING_LINEAR_PCM, 3000, "3000 Hz"),
    ],
)
async def test_bad_audio_is_invalid_argument_saying_what_is_accepted(
    speech: SpeechClient, audio: bytes, encoding: int, rate: int, expected: str
) -> None:
    config = speech_pb2.RecognitionConfig(encoding=encoding, sample_rate_hertz=rate)
    with pytest.raises(InvalidArgument) as error:
        await speech.recognize(config, audio)
    assert expected in error.value.message and "accepted" in error.value.message
    with pytest.raises(InvalidArgument):
        [r async for r in speech.recognize_stream(speech_pb2.StreamingRecognitionConfig(config=config), chunks_of(audio), None)]


async def test_stream_must_start_with_its_configuration(speech_addr: str) -> None:
    # Audio before any configuration: only a raw stub sends such a stream.
    chunks = [speech_pb2.StreamingRecognizeRequest(audio_content=b"\x00\x00" * 160)]
    async with grpc.aio.insecure_channel(speech_addr) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            [r async for r in speech_pb2_grpc.SpeechServiceStub(channel).StreamingRecognize(iter(chunks), metadata=ADMIN)]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "streaming_config" in error.value.details()


async def test_synthesized_speech_is_recognized_back_with_the_domain_model(speech: SpeechClient, speech_settings: SpeechSettings) -> None:
    questions = ["Where is my parcel?", "How long does a refund take to reach my card?"]
    errors = WordErrors()
    for question in questions:
        before = await last_sequence(speech_settings.nats_url, SPEECH_SYNTHESIZED)
        spoken = await speech.synthesize(
            speech_pb2.SynthesizeSpeechRequest(text=question, encoding=speech_pb2.AUDIO_ENCODING_WAV, sample_rate_hz=16000, voice_name="jm_kumo"),
        )
        assert spoken.sample_rate_hz == 16000 and spoken.audio[:4] == b"RIFF" and 700 < spoken.duration_ms < 6000
        event = events_pb2.SpeechSynthesized.FromString((await last_message(speech_settings.nats_url, SPEECH_SYNTHESIZED, after_seq=before)).data)
        assert event.voice == "jm_kumo" and event.characters == len(question)
        heard = await speech.recognize(speech_pb2.RecognitionConfig(model="domain"), spoken.audio)
        errors += word_errors(words(question), words(transcript(heard)))
    # Kokoro reading English through espeak phonemes, heard by PocketSphinx: most words, not all.
    assert errors.wer <= 0.3


async def test_synthesize_stream_speaks_sentence_by_sentence(speech: SpeechClient) -> None:
    text = "Your order has shipped. It arrives on Friday!"
    pieces = [p async for p in speech.synthesize_stream(
        speech_pb2.SynthesizeSpeechRequest(text=text, voice_name="espeak-en-us", sample_rate_hz=8000), None)]
    assert [p.text for p in pieces] == ["Your order has shipped.", "It arrives on Friday!"]
    assert all(p.sample_rate_hz == 8000 and p.encoding == speech_pb2.AUDIO_ENCODING_LINEAR_PCM for p in pieces)
    assert all(abs(len(p.audio) // 2 * 1000 // 8000 - p.duration_ms) <= 1 and p.duration_ms > 500 for p in pieces)


async def test_voices_and_synthesis_limits(speech: SpeechClient) -> None:
    voices = await speech.voices()
    engines = {v.name: v.engine for v in voices}
    assert engines["jm_kumo"] == "kokoro" and engines["espeak-en-us"] == "espeak-ng"
    for request, field in [
        (speech_pb2.SynthesizeSpeechRequest(text=""), "text"),
        (speech_pb2.SynthesizeSpeechRequest(text="hi", voice_name="nobody"), "voice_name"),
        (speech_pb2.SynthesizeSpeechRequest(text="hi", sample_rate_hz=96000), "sample_rate_hz"),
        (speech_pb2.SynthesizeSpeechRequest(text="hi", speed=5), "speed"),
        (speech_pb2.SynthesizeSpeechRequest(text="x" * 5001), "text"),
    ]:
        with pytest.raises(InvalidArgument) as error:
            await speech.synthesize(request)
        assert field in error.value.message


async def test_domain_model_is_refused_for_a_tenant_without_one(speech: SpeechClient) -> None:
    with pytest.raises(FailedPrecondition):
        await speech.recognize(
            speech_pb2.RecognitionConfig(model="domain", tenant="nobody-has-text"), encode_wav(np.zeros(1600, np.int16), 16000)
        )


async def test_bad_indexed_event_is_dead_lettered_and_service_goes_on(speech: SpeechClient, speech_settings: SpeechSettings) -> None:
    import nats

    url = speech_settings.nats_url
    dlq = dead_letter_subject(DOCS_INDEXED)
    before = await last_sequence(url, dlq)
    connection = await nats.connect(url)
    try:
        await connection.jetstream().publish(DOCS_INDEXED, events_pb2.DocumentIndexed(document_id="no-tenant").SerializeToString())
    finally:
        await connection.close()
    # Other consumers of docs.indexed dead-letter on the same subject: find speech's letter for this event.
    for _ in range(200):
        letters = [events_pb2.DeadLetter.FromString(data) for data in await messages_after(url, dlq, before)]
        ours = [letter for letter in letters if letter.service == "speech" and b"no-tenant" in letter.payload]
        if ours:
            break
        await asyncio.sleep(0.1)
    assert ours and "tenant" in ours[0].error
    assert await speech.voices()


# Resident memory a ten-minute recording (19 MB of audio) may add to a warmed-up service, and
# its last five minutes (9.6 MB): keeping the audio would add all of it, keeping a sixth of it
# breaks the second bound.
RECORDING_GROWTH_MB = 5.0
LAST_HALF_GROWTH_MB = 1.5
WARM_UP_MINUTES = 10


async def stream_recording(speech: SpeechClient, utterance: np.ndarray, rng: np.random.Generator, minutes: int,
                           samples: list[float]) -> int:
    """Stream `minutes` at 16 kHz, a real utterance every 30 s with quiet room noise between;
    the process's anonymous memory goes to `samples` after every 30 s block. The final results."""
    period = 30 * 16000
    config = speech_pb2.StreamingRecognitionConfig(
        config=speech_pb2.RecognitionConfig(encoding=speech_pb2.AUDIO_ENCODING_LINEAR_PCM, sample_rate_hertz=16000, model="general"),
    )
    finals = 0

    async def recording() -> AsyncIterator[bytes]:
        for _ in range(minutes * 2):
            # Noise drawn a second at a time: one 30 s draw in float64 would be this process's own
            # 4 MB churn, blurring the service's figure.
            block = np.concatenate([rng.normal(0, 30, 16000).astype(np.int16) for _ in range(period // 16000)])
            block[16000:16000 + len(utterance)] = utterance
            for start in range(0, period, 16000):  # one-second chunks
                yield block[start:start + 16000].tobytes()
            samples.append(anon_rss_mb())

    async for result in speech.recognize_stream(config, recording(), None):
        finals += result.is_final
        assert "surpassed" in result.alternatives[0].transcript
    return finals


@pytest.mark.faults
async def test_ten_minute_recording_streams_without_growing_memory(speech: SpeechClient) -> None:
    """The service runs in this process; its anonymous memory (where kept audio or lattices
    would live) is read after every 30 s block of a ten-minute recording, once the service is
    warm: its worker threads all started (they start lazily, each with its own malloc arena,
    which grows the first time decodes run there) and a first recording heard. Measured: the
    first ten minutes add about 10 MB (arenas filling), the next ten 1-2 MB, the next 0.4 MB:
    converging, where kept audio would add 19 MB each time."""
    utterance, rate = clip(LJ / "LJ001-0008.wav")
    utterance = resample(utterance, rate, 16000)
    rng = np.random.default_rng(1)
    workers = min(32, (os.cpu_count() or 1) + 4)  # the default executor's threads, as asyncio.to_thread sizes it
    await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.2) for _ in range(workers)))
    warm_up: list[float] = []
    assert await stream_recording(speech, utterance, rng, WARM_UP_MINUTES, warm_up) == WARM_UP_MINUTES * 2
    minutes, samples = 10, []
    assert await stream_recording(speech, utterance, rng, minutes, samples) == minutes * 2
    start, half = warm_up[-1], len(samples) // 2
    growth, last_half_growth = max(samples) - start, max(samples[half:]) - samples[half - 1]
    print(f"speech: anonymous RSS {warm_up[0]:.1f} MB after the first 30 s, {start:.1f} MB after a {WARM_UP_MINUTES}-minute "
          f"warm-up; a {minutes}-minute recording ({minutes * 60 * 16000 * 2 / 1e6:.1f} MB of audio) adds {growth:.2f} MB "
          f"(bound {RECORDING_GROWTH_MB} MB), its last half {last_half_growth:.2f} MB (bound {LAST_HALF_GROWTH_MB} MB): "
          f"{[round(s, 1) for s in samples]}")
    assert growth < RECORDING_GROWTH_MB, samples
    assert last_half_growth < LAST_HALF_GROWTH_MB, samples
