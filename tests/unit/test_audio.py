"""Audio I/O: WAV and LINEAR16 validation, streaming WAV headers, resampling, endpointing."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from llmos.audio import (
    Encoding,
    EndpointConfig,
    Endpointer,
    PcmStream,
    Resampler,
    SpeechAudio,
    SpeechEnd,
    SpeechStart,
    decode_clip,
    encode_wav,
    resample,
)
from llmos.errors import InvalidArgument

pytestmark = pytest.mark.unit


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1, bits: int = 16, tag: int = 1) -> bytes:
    data = samples.astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * freq * t) * amplitude * 32767).astype(np.int16)


def test_wav_round_trip_keeps_samples_and_rate() -> None:
    samples = tone(440, 0.5, 22050)
    clip = decode_clip(encode_wav(samples, 22050), Encoding.WAV, 0)
    assert clip.sample_rate == 22050 and np.array_equal(clip.samples, samples)
    assert clip.duration_ms == 500


def test_linear16_takes_the_declared_rate() -> None:
    samples = tone(300, 0.25, 8000)
    clip = decode_clip(samples.astype("<i2").tobytes(), Encoding.LINEAR16, 8000)
    assert clip.sample_rate == 8000 and len(clip.samples) == 2000


@pytest.mark.parametrize(
    ("data", "encoding", "rate", "expected"),
    [
        (b"", Encoding.WAV, 0, "no audio"),
        (b"", Encoding.LINEAR16, 16000, "no audio"),
        (b"RIFX\x00\x00\x00\x00WAVEfmt ", Encoding.WAV, 0, "RIFF/WAVE"),
        (b"OggS" + b"\x00" * 40, Encoding.WAV, 0, "not a WAV file"),
        (wav_bytes(np.zeros(200, np.int16), 16000, channels=2), Encoding.WAV, 0, "2 channels"),
        (wav_bytes(np.zeros(200, np.int16), 3000), Encoding.WAV, 0, "3000 Hz"),
        (wav_bytes(np.zeros(200, np.int16), 16000, bits=8), Encoding.WAV, 0, "8-bit"),
        (wav_bytes(np.zeros(200, np.int16), 16000, tag=3), Encoding.WAV, 0, "not PCM"),
        (b"\x00\x01\x02", Encoding.LINEAR16, 16000, "whole number of 16-bit samples"),
        (b"\x00\x01", Encoding.LINEAR16, 3000, "3000 Hz"),
        (b"\x00\x01", Encoding.LINEAR16, 96000, "96000 Hz"),
    ],
)
def test_bad_audio_is_refused_saying_what_is_accepted(data: bytes, encoding: Encoding, rate: int, expected: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        decode_clip(data, encoding, rate)
    assert expected in error.value.message
    if expected != "not PCM":
        assert "accepted" in error.value.message or "WAV data" in error.value.message


def test_wav_stream_header_may_arrive_in_pieces() -> None:
    samples = tone(440, 0.1, 16000)
    data = wav_bytes(samples, 16000)
    stream = PcmStream(Encoding.WAV, 0)
    pieces = [stream.feed(data[i:i + 7]) for i in range(0, len(data), 7)]
    assert stream.sample_rate == 16000
    assert np.array_equal(np.concatenate(pieces), samples)


def test_resampling_in_chunks_equals_resampling_whole() -> None:
    samples = tone(440, 1.0, 44100)
    whole = resample(samples, 44100, 16000)
    resampler = Resampler(44100, 16000)
    chunks = np.concatenate([resampler.process(samples[i:i + 1234]) for i in range(0, len(samples), 1234)])
    assert abs(len(whole) - 16000) <= 1
    assert np.array_equal(whole, chunks)


@pytest.mark.parametrize(("source", "target"), [(8000, 16000), (22050, 16000), (48000, 16000), (24000, 8000)])
def test_resampling_keeps_a_tone_and_removes_aliases(source: int, target: int) -> None:
    out = resample(tone(440, 1.0, source), source, target).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(out[: target // 2 * 2]))
    peak_hz = np.argmax(spectrum) * target / (len(out[: target // 2 * 2]))
    assert abs(peak_hz - 440) < 5
    assert abs(len(out) - target) <= 1
    # A tone above the target's Nyquist frequency must not fold back into the band.
    if source > target:
        folded = resample(tone(0.47 * source, 1.0, source), source, target).astype(np.float64)
        assert np.sqrt(np.mean(folded[200:] ** 2)) < 0.02 * 32767 * 0.3


def test_endpointer_finds_speech_like_bursts_between_silences() -> None:
    rate = Endpointer.SAMPLE_RATE
    rng = np.random.default_rng(0)
    # Voiced-like bursts: harmonics of 150 Hz with a little noise; the VAD calls them speech.
    burst = sum(tone(150 * k, 1.0, rate, 0.08 / k) for k in range(1, 12)).astype(np.int16)
    burst = (burst + rng.normal(0, 100, len(burst))).astype(np.int16)
    silence = np.zeros(rate, np.int16)
    audio = np.concatenate([silence, burst, silence, silence, burst, silence])
    endpointer = Endpointer(EndpointConfig(start_history_ms=150, stop_history_ms=450))
    events = list(endpointer.process(audio[:12345])) + list(endpointer.process(audio[12345:])) + list(endpointer.flush())
    starts = [e.start_ms for e in events if isinstance(e, SpeechStart)]
    ends = [e.end_ms for e in events if isinstance(e, SpeechEnd)]
    assert len(starts) == 2 and len(ends) == 2
    assert abs(starts[0] - 1000) <= 200 and abs(starts[1] - 4000) <= 200
    assert 2000 <= ends[0] <= 2700 and 5000 <= ends[1] <= 5700
    # Audio is only passed on between a start and its end.
    inside = False
    for event in events:
        if isinstance(event, SpeechStart):
            inside = True
        elif isinstance(event, SpeechEnd):
            inside = False
        else:
            assert isinstance(event, SpeechAudio) and inside


def test_endpointing_limits_are_validated() -> None:
    with pytest.raises(InvalidArgument, match="endpointing.stop_threshold"):
        EndpointConfig(stop_threshold=1.5).validated()
    with pytest.raises(InvalidArgument, match="endpointing.start_history_ms"):
        EndpointConfig(start_history_ms=5).validated()
