"""Voice turns in one process: real recordings, PocketSphinx recognition and espeak-ng synthesis
in-process, a turn logic that streams a long answer slowly; barge-in timing measured precisely."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from llmos.audio import Encoding, EndpointConfig, decode_clip, pcm_to_samples, resample, samples_to_pcm
from llmos.auth import Principal
from llmos.deadline import Deadline
from llmos.errors import InvalidArgument
from llmos.v1 import dialogue_pb2, speech_pb2
from services.dialogue.voice import SpeechDetector, VoiceLimits, VoiceTurns, first_pieces
from services.speech.asr import AsrEngine, StreamingRecognizer
from services.speech.tts import EspeakVoice, VoiceCatalog, espeak_available

pytestmark = pytest.mark.unit

LJ = Path(__file__).resolve().parents[3] / "shared" / "data" / "speech" / "ljspeech_coqui-ai_TTS"
RATE = 16000
CHUNK = RATE // 10  # 100 ms
PRINCIPAL = Principal("tester", "acme", frozenset({"user"}))
ANSWER = [
    "Standard delivery takes three working days, ", "and express delivery takes one. ", "You can follow the parcel ",
    "with the tracking link in your e-mail. ", "Returns are free for thirty days, ", "and refunds reach your card in a week. ",
]


def recording(name: str) -> np.ndarray:
    clip = decode_clip((LJ / name).read_bytes(), Encoding.WAV, 0)
    return resample(clip.samples, clip.sample_rate, RATE)


def chunks(samples: np.ndarray) -> list[bytes]:
    return [samples_to_pcm(samples[i:i + CHUNK]) for i in range(0, len(samples), CHUNK)]


class SlowAnswers:
    """The turn logic: an answer streamed in pieces 150 ms apart; records when a turn was cancelled."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.cancelled_at: list[float] = []

    async def chat(self, principal: Principal, tenant: str, request: dialogue_pb2.ChatRequest, deadline: Deadline | None
                   ) -> AsyncIterator[dialogue_pb2.ChatResponse]:
        self.messages.append(request.message)
        session_id = request.session_id or "session-1"
        try:
            yield dialogue_pb2.ChatResponse(session_id=session_id, intent=dialogue_pb2.Intent(name="delivery", confidence=0.9))
            for delta in ANSWER:
                await asyncio.sleep(0.15)
                yield dialogue_pb2.ChatResponse(session_id=session_id, delta=delta)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled_at.append(time.perf_counter())
            raise
        yield dialogue_pb2.ChatResponse(session_id=session_id, final=True)


class InProcessRecognizer:
    """The speech service's own streaming recognizer, driven in a worker thread."""

    def __init__(self) -> None:
        self._engine = AsrEngine(1, 30.0, 0.5)

    async def recognize_stream(self, config: speech_pb2.StreamingRecognitionConfig, audio: AsyncIterator[bytes], timeout_s: float | None
                               ) -> AsyncIterator[speech_pb2.SpeechRecognitionResult]:
        recognizer = StreamingRecognizer(self._engine, RATE, EndpointConfig(), interim_results=config.interim_results)
        try:
            async for chunk in audio:
                for result in await asyncio.to_thread(recognizer.feed, pcm_to_samples(chunk)):
                    yield speech_pb2.SpeechRecognitionResult(
                        alternatives=[speech_pb2.SpeechRecognitionAlternative(transcript=result.transcript)],
                        is_final=result.is_final,
                    )
            for result in await asyncio.to_thread(recognizer.finish):
                yield speech_pb2.SpeechRecognitionResult(
                    alternatives=[speech_pb2.SpeechRecognitionAlternative(transcript=result.transcript)], is_final=True
                )
        finally:
            recognizer.close()


class EspeakSynthesizer:
    def __init__(self) -> None:
        self._voices = VoiceCatalog([EspeakVoice()], "espeak-en-us")

    async def synthesize_stream(self, request: speech_pb2.SynthesizeSpeechRequest, timeout_s: float
                                ) -> AsyncIterator[speech_pb2.SynthesizeSpeechResponse]:
        voice = self._voices.get(request.voice_name)
        samples = await asyncio.to_thread(voice.speak, request.text, 1.0)
        yield speech_pb2.SynthesizeSpeechResponse(
            audio=samples_to_pcm(samples), sample_rate_hz=voice.info.sample_rate,
            duration_ms=len(samples) * 1000 // voice.info.sample_rate, text=request.text,
        )


def voice_turns(answers: SlowAnswers) -> VoiceTurns:
    return VoiceTurns(answers, InProcessRecognizer(), EspeakSynthesizer(), VoiceLimits(2, EndpointConfig(), 30.0))


CONFIG = dialogue_pb2.ConverseConfig(
    recognition=speech_pb2.StreamingRecognitionConfig(
        config=speech_pb2.RecognitionConfig(encoding=speech_pb2.AUDIO_ENCODING_LINEAR_PCM, sample_rate_hertz=RATE),
        interim_results=True,
    )
)


def speech_start_chunk(stream: list[bytes], utterance: int) -> int:
    """Index of the chunk in which the detector notices the start of the `utterance`-th utterance (0-based)."""
    detector = SpeechDetector(EndpointConfig(), 2, False, RATE)
    seen = 0
    for index, chunk in enumerate(stream):
        for _ in detector.feed(chunk):
            if seen == utterance:
                return index
            seen += 1
    raise AssertionError("the detector found no such utterance")


@pytest.mark.skipif(not espeak_available() or not LJ.exists(), reason="needs espeak-ng and the shared recordings")
async def test_speech_over_the_answer_cancels_it_within_200_ms_and_starts_the_next_turn() -> None:
    silence = np.zeros(RATE, np.int16)
    first = chunks(np.concatenate([recording("LJ001-0004.wav"), silence]))
    second = chunks(np.concatenate([recording("LJ001-0008.wav"), silence]))
    detect_at = speech_start_chunk(first + second, 1) - len(first)
    assert 0 <= detect_at < len(second)
    answers = SlowAnswers()
    answer_audible = asyncio.Event()
    second_turn_done = asyncio.Event()
    sent: dict[str, float] = {}

    async def audio() -> AsyncIterator[bytes]:
        for chunk in first:
            yield chunk
        await answer_audible.wait()  # the first answer is being spoken: talk over it
        for index, chunk in enumerate(second):
            if index == detect_at:
                sent["detected"] = time.perf_counter()
            yield chunk
            await asyncio.sleep(0.01)
        await second_turn_done.wait()

    events: list[tuple[float, dialogue_pb2.ConverseResponse]] = []
    async for event in voice_turns(answers).converse(PRINCIPAL, "acme", CONFIG, audio(), None):
        events.append((time.perf_counter(), event))
        kind = event.WhichOneof("event")
        if kind == "audio":
            answer_audible.set()
        if kind == "turn_completed":
            second_turn_done.set()

    kinds = [event.WhichOneof("event") for _, event in events]
    assert kinds.count("barge_in") == 1 and kinds.count("turn_completed") == 1
    barge = kinds.index("barge_in")
    barge_at = events[barge][0]
    assert answers.cancelled_at, "the first answer's generation was cancelled"
    assert answers.cancelled_at[0] - sent["detected"] <= 0.2
    assert barge_at - sent["detected"] <= 0.2
    # Nothing more of the first answer after the barge-in; the second turn answers the new words.
    finals = [event.transcript.alternatives[0].transcript for _, event in events if event.WhichOneof("event") == "transcript"
              and event.transcript.is_final]
    assert len(answers.messages) == 2 and answers.messages == finals
    assert "surpassed" in answers.messages[1]
    after = kinds[barge + 1:]
    first_new_delta = after.index("answer_delta")
    assert "transcript" in after[:first_new_delta], "the next answer starts only after the new transcript"
    assert events[-1][1].turn_completed.intent.name == "delivery" and events[-1][1].session_id == "session-1"


@pytest.mark.skipif(not espeak_available() or not LJ.exists(), reason="needs espeak-ng and the shared recordings")
async def test_the_answer_is_heard_before_it_is_complete() -> None:
    answers = SlowAnswers()

    async def audio() -> AsyncIterator[bytes]:
        for chunk in chunks(np.concatenate([recording("LJ001-0004.wav"), np.zeros(RATE, np.int16)])):
            yield chunk

    kinds = [event.WhichOneof("event") async for event in voice_turns(answers).converse(PRINCIPAL, "acme", CONFIG, audio(), None)]
    assert kinds[-1] == "turn_completed" and "barge_in" not in kinds
    first_audio = kinds.index("audio")
    assert "answer_delta" in kinds[first_audio + 1:], "audio of the first clause came while the answer was still streaming"
    assert kinds.count("audio") == 4  # the first clause, then the three sentences
    assert "transcript" in kinds[:kinds.index("answer_delta")]


def test_linear_pcm_without_a_rate_is_refused() -> None:
    config = dialogue_pb2.ConverseConfig(
        recognition=speech_pb2.StreamingRecognitionConfig(
            config=speech_pb2.RecognitionConfig(encoding=speech_pb2.AUDIO_ENCODING_LINEAR_PCM)
        )
    )

    async def no_audio() -> AsyncIterator[bytes]:
        yield b""

    async def run() -> None:
        async for _ in voice_turns(SlowAnswers()).converse(PRINCIPAL, "acme", config, no_audio(), None):
            pass

    with pytest.raises(InvalidArgument, match="sample_rate_hertz"):
        asyncio.run(run())


@pytest.mark.skipif(not espeak_available() or not LJ.exists(), reason="needs espeak-ng and the shared recordings")
async def test_a_failed_synthesis_ends_the_turn_at_once() -> None:
    answers = SlowAnswers()
    config = dialogue_pb2.ConverseConfig()
    config.CopyFrom(CONFIG)
    config.voice_name = "nobody"

    async def audio() -> AsyncIterator[bytes]:
        for chunk in chunks(np.concatenate([recording("LJ001-0004.wav"), np.zeros(RATE, np.int16)])):
            yield chunk

    with pytest.raises(InvalidArgument, match="voice_name"):
        async for _ in voice_turns(answers).converse(PRINCIPAL, "acme", config, audio(), None):
            pass
    assert answers.cancelled_at, "generation stopped when the first piece could not be spoken"


@pytest.mark.parametrize(("piece", "expected"), [
    ("Once the status changes to Packing or Shipped,", ["Once the status changes,", "to Packing or Shipped,"]),
    ("Express delivery arrives the next working day in most EU countries and costs 12 EUR.",
     ["Express delivery arrives the next working day,", "in most EU countries and costs 12 EUR."]),
    ("Standard delivery takes three working days,", ["Standard delivery takes three working days,"]),  # short enough
    ("Delivery outside the EU takes 4 to 8 working days and costs 14 EUR;",  # "4 to 8" is not cut
     ["Delivery outside the EU takes 4 to 8 working days,", "and costs 14 EUR;"]),
    ("Delivery outside the EU takes four to eight working days and costs 14 EUR;",  # nor "four to eight"
     ["Delivery outside the EU takes four to eight working days,", "and costs 14 EUR;"]),
    ("I'm sorry, our help centre does not say.", ["I'm sorry, our help centre does not say."]),  # no phrase opener
])
def test_a_long_first_piece_is_cut_before_a_phrase(piece: str, expected: list[str]) -> None:
    pieces = first_pieces(piece)
    assert pieces == expected
    assert " ".join(pieces).replace(",", "").split() == piece.replace(",", "").split()  # the same words, in order
