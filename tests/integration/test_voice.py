"""Voice turns over DialogueService.Converse against the whole running stack: real recognition,
the Chat turn logic, real synthesis; multi-turn sessions, barge-in and bad input."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from llmos.audio import Encoding, EndpointConfig, decode_clip, pcm_to_samples, samples_to_pcm
from llmos.clients import DialogueClient, SpeechClient
from llmos.utterances import split_for_speech, split_sentences
from llmos.v1 import dialogue_pb2, dialogue_pb2_grpc, speech_pb2
from services.dialogue.voice import SpeechDetector
from tests.conftest import TEST_API_KEY, RunningStack
from tests.grpc_helpers import ADMIN, connected
from tests.integration.test_dialogue import index_demo_kb

pytestmark = pytest.mark.integration

RATE = 16000
CHUNK = RATE // 10  # 100 ms, as a microphone would send
QUESTION_VOICE = "jm_kumo"  # Kokoro: PocketSphinx hears it far better than espeak-ng
ANSWER_VOICE = "espeak-en-us"  # instant, to keep the tests short on a small machine
CONFIG = dialogue_pb2.ConverseConfig(
    recognition=speech_pb2.StreamingRecognitionConfig(
        config=speech_pb2.RecognitionConfig(encoding=speech_pb2.AUDIO_ENCODING_LINEAR_PCM, sample_rate_hertz=RATE),
        interim_results=True,
    ),
    voice_name=ANSWER_VOICE,
    output_sample_rate_hz=RATE,
)


@pytest.fixture
async def clients(stack: RunningStack) -> AsyncIterator[tuple[DialogueClient, SpeechClient]]:
    await index_demo_kb(stack, ("giftcards", "shipping", "returns"))
    async with connected(stack, DialogueClient) as dialogue, connected(stack, SpeechClient) as speech:
        yield dialogue, speech


async def spoken(speech: SpeechClient, text: str) -> np.ndarray:
    """`text` said by the speech service, after a short pause and before a second of silence (the end of the turn)."""
    response = await speech.synthesize(
        speech_pb2.SynthesizeSpeechRequest(text=text, voice_name=QUESTION_VOICE, sample_rate_hz=RATE), timeout_s=60
    )
    return np.concatenate([np.zeros(RATE * 3 // 10, np.int16), pcm_to_samples(response.audio), np.zeros(RATE, np.int16)])


def chunks(samples: np.ndarray) -> list[bytes]:
    return [samples_to_pcm(samples[i:i + CHUNK]) for i in range(0, len(samples), CHUNK)]


def kinds(events: list[dialogue_pb2.ConverseResponse]) -> list[str]:
    return [str(event.WhichOneof("event")) for event in events]


async def test_two_voice_turns_in_one_session(clients: tuple[DialogueClient, SpeechClient]) -> None:
    dialogue, speech = clients
    first = chunks(await spoken(speech, "How long is a gift card valid?"))
    second = chunks(await spoken(speech, "Thank you."))
    first_done = asyncio.Event()

    async def microphone() -> AsyncIterator[bytes]:
        for chunk in first:
            yield chunk
        await first_done.wait()  # speaking again earlier would be a barge-in
        for chunk in second:
            yield chunk

    events: list[dialogue_pb2.ConverseResponse] = []
    async for event in dialogue.converse(CONFIG, microphone(), 300):
        events.append(event)
        if event.WhichOneof("event") == "turn_completed":
            first_done.set()
    turns = [i for i, kind in enumerate(kinds(events)) if kind == "turn_completed"]
    assert len(turns) == 2, kinds(events)
    one, two = events[:turns[0] + 1], events[turns[0] + 1:]
    finals = [e.transcript.alternatives[0].transcript for e in events if e.WhichOneof("event") == "transcript" and e.transcript.is_final]
    assert "gift card" in finals[0] and "thank" in finals[1], finals
    assert "transcript" in kinds(one)[:kinds(one).index("answer_delta")]
    assert any(not e.transcript.is_final for e in one if e.WhichOneof("event") == "transcript"), "interim results first"
    # The grounded answer is short, as spoken answers are, and spoken piece by piece (that audio
    # starts before the text is complete is shown in tests/unit/test_voice.py, where timing is ours).
    answer = "".join(e.answer_delta for e in one)
    assert 1 <= len([sentence for sentence in split_sentences(answer) if len(sentence) >= 8]) <= 2, answer
    audio = [e.audio for e in one if e.WhichOneof("event") == "audio"]
    assert kinds(one).index("answer_delta") < kinds(one).index("audio")
    assert len(audio) >= len(split_for_speech(answer))
    assert all(a.sample_rate_hz == RATE and a.encoding == speech_pb2.AUDIO_ENCODING_LINEAR_PCM and a.duration_ms > 0 for a in audio)
    completed = one[-1].turn_completed
    assert completed.final and "giftcards" in {c.document_id for c in completed.citations}, answer
    assert two[-1].turn_completed.intent.name == "thanks"
    session_id = events[-1].session_id
    assert session_id and all(e.session_id == session_id for e in events[turns[0]:])
    session = await dialogue.session(session_id)
    assert [turn.user_message for turn in session.turns] == finals[:2]
    assert session.turns[0].answer == answer.strip()


async def test_speech_over_the_answer_cancels_it_within_200_ms(clients: tuple[DialogueClient, SpeechClient]) -> None:
    dialogue, speech = clients
    question = chunks(await spoken(speech, "How do I return an item?"))
    interruption = chunks(await spoken(speech, "Where is my parcel?"))
    # Where the service's detector (same defaults) notices the interruption: the chunk that completes its start window.
    detector = SpeechDetector(EndpointConfig(), 2, False, RATE)
    starts = [index for index, chunk in enumerate(question + interruption) for _ in detector.feed(chunk)]
    detect_at = starts[1] - len(question)
    answer_audible = asyncio.Event()
    done = asyncio.Event()
    sent_at = 0.0

    async def microphone() -> AsyncIterator[bytes]:
        nonlocal sent_at
        for chunk in question:
            yield chunk
        await answer_audible.wait()
        for index, chunk in enumerate(interruption):
            if index == detect_at:
                sent_at = time.perf_counter()
            yield chunk
            await asyncio.sleep(0.02)
        await done.wait()

    events: list[tuple[float, dialogue_pb2.ConverseResponse]] = []
    async for event in dialogue.converse(CONFIG, microphone(), 300):
        events.append((time.perf_counter(), event))
        kind = event.WhichOneof("event")
        if kind == "audio":
            answer_audible.set()
        if kind == "turn_completed":
            done.set()
    order = kinds([event for _, event in events])
    assert order.count("barge_in") == 1, order
    barge = order.index("barge_in")
    # The answer is ready at once (quoted evidence) and its audio sent faster than it plays: the
    # caller interrupts it while it is still playing, which is what barge-in is for.
    first_audio = next(at for at, event in events if event.WhichOneof("event") == "audio")
    played_ms = sum(event.audio.duration_ms for _, event in events[:barge] if event.WhichOneof("event") == "audio")
    assert events[barge][0] - first_audio < played_ms / 1000, "the barge-in came after the answer had played out"
    assert events[barge][0] - sent_at <= 0.2
    # The interruption became the next turn; nothing of the first answer came after the barge-in.
    after = order[barge + 1:]
    assert after.index("transcript") < after.index("answer_delta") and after[-1] == "turn_completed"
    finals = [e.transcript.alternatives[0].transcript for _, e in events[barge:] if e.WhichOneof("event") == "transcript" and e.transcript.is_final]
    assert "parcel" in finals[0]


async def test_converse_rejects_bad_streams(stack: RunningStack) -> None:
    """Streams of the wrong shape, which only a raw stub sends (the client always opens with the configuration)."""
    stereo = bytearray(b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x02\x00\x80>\x00\x00\x00}\x00\x00\x04\x00\x10\x00data\x00\x00\x00\x00")
    cases = [
        ([dialogue_pb2.ConverseRequest(audio_content=b"\x00\x00")], "config"),
        ([dialogue_pb2.ConverseRequest(config=CONFIG), dialogue_pb2.ConverseRequest(config=CONFIG)], "only the first"),
        ([dialogue_pb2.ConverseRequest(config=dialogue_pb2.ConverseConfig()), dialogue_pb2.ConverseRequest(audio_content=bytes(stereo))],
         "mono"),
    ]
    async with grpc.aio.insecure_channel(stack.addr("dialogue")) as channel:
        dialogue = dialogue_pb2_grpc.DialogueServiceStub(channel)
        for requests, expected in cases:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in dialogue.Converse(iter(requests), metadata=ADMIN, timeout=60):
                    pass
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in error.value.details()


async def test_llmos_voice_answers_the_demo_recording_aloud(clients: tuple[DialogueClient, SpeechClient], stack: RunningStack, tmp_path: Path) -> None:
    question = Path(__file__).resolve().parents[2] / "demo" / "voice" / "gift-card-question.wav"  # what `llmos demo` plays
    answer = tmp_path / "answer.wav"
    env = {**stack.env, "LLMOS_API_KEY": TEST_API_KEY}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "llmos_cli.main", "voice", str(question), "-o", str(answer), "--voice", ANSWER_VOICE],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert "gift card" in lines["you said"] and lines["assistant"].strip()
    assert "first answer audio" in lines["from the end of speech"] and " ms" in lines["from the end of speech"]
    clip = decode_clip(answer.read_bytes(), Encoding.WAV, 0)
    assert clip.sample_rate == 22050 and len(clip.samples) > clip.sample_rate  # espeak-ng's rate, over a second of speech
