"""The final decode of a segment starts in the silence after its speech (services.speech.asr),
and is thrown away when the speaker goes on."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import services.speech.asr as asr
from llmos.audio import EndpointConfig, Encoding, decode_clip, resample
from services.speech.asr import AsrEngine, Recognition, StreamingRecognizer, recognize_clip

pytestmark = pytest.mark.unit

SPEECH = Path(__file__).resolve().parents[3] / "shared" / "data" / "speech"
RATE = 16000
CHUNK = RATE // 10


def recording(name: str) -> np.ndarray:
    clip = decode_clip((SPEECH / name).read_bytes(), Encoding.WAV, 0)
    return resample(clip.samples, clip.sample_rate, RATE)


def silence(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, np.int16)


def finals(engine: AsrEngine, audio: np.ndarray) -> list[Recognition]:
    recognizer = StreamingRecognizer(engine, RATE, EndpointConfig(), interim_results=True)
    results = []
    for start in range(0, len(audio), CHUNK):
        results += recognizer.feed(audio[start:start + CHUNK])
    results += recognizer.finish()
    return [result for result in results if result.is_final]


@pytest.fixture
def decoded_in(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads that ran each final decode."""
    threads: list[str] = []
    original = asr._final_decode

    def recorded(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(asr, "_final_decode", recorded)
    return threads


@pytest.mark.skipif(not SPEECH.exists(), reason="needs the shared recordings")
def test_the_final_is_decoded_in_the_silence_before_the_end_is_detected(decoded_in: list[str]) -> None:
    audio = np.concatenate([silence(300), recording("ljspeech_coqui-ai_TTS/LJ001-0002.wav"), silence(1200)])
    # One decoder: the live (interim) decode holds it, so nothing is speculated; two: one is free.
    at_the_end = finals(AsrEngine(1, 10.0, 0.5), audio)
    assert decoded_in == ["MainThread"]
    decoded_in.clear()
    speculated = finals(AsrEngine(2, 10.0, 0.5), audio)
    assert decoded_in == ["asr-speculation"]
    for result in (*at_the_end, *speculated):
        assert len(set(result.transcript.split()) & {"in", "being", "comparatively", "modern"}) >= 3, result.transcript
        assert result.words and result.words[-1].end_ms <= result.audio_processed_ms


@pytest.mark.skipif(not SPEECH.exists(), reason="needs the shared recordings")
def test_speech_after_a_short_pause_throws_the_speculative_decode_away(decoded_in: list[str]) -> None:
    # 450 ms of silence: past the speculation point, short of the 700 ms stop window: one segment.
    first = recording("librivox_cmusphinx_pocketsphinx/sense_and_sensibility_01_austen_64kb-0880.wav")
    second = recording("librivox_cmusphinx_pocketsphinx/sense_and_sensibility_01_austen_64kb-0930.wav")
    audio = np.concatenate([silence(300), first, silence(450), second, silence(1200)])
    results = finals(AsrEngine(2, 10.0, 0.5), audio)
    assert len(results) == 1
    # The pause's decode (the first sentence) was thrown away; the closing silence's one, of the
    # whole segment, is the final.
    assert decoded_in == ["asr-speculation", "asr-speculation"]
    assert len(results[0].transcript.split()) >= 12  # both sentences' words


@pytest.mark.skipif(not SPEECH.exists(), reason="needs the shared recordings")
def test_a_whole_clip_is_not_decoded_speculatively(decoded_in: list[str]) -> None:
    # Recognize has all the audio: a background decode in a pause would only be thrown away.
    audio = np.concatenate([silence(300), recording("ljspeech_coqui-ai_TTS/LJ001-0002.wav"), silence(1200)])
    results = recognize_clip(AsrEngine(2, 10.0, 0.5), audio, RATE, EndpointConfig())
    assert decoded_in == ["MainThread"] and len(results) == 1
