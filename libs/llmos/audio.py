"""Audio in and out for the speech paths: WAV / LINEAR16 parsing, resampling, endpointing.

Accepted input is 16-bit signed little-endian PCM, mono, at 8-48 kHz, either raw (LINEAR16)
or in a RIFF/WAVE container; anything else is an InvalidArgument that says what is accepted.
Everything here works on streams as well as whole clips, with bounded state, so a recording of
any length can pass through without memory growing: the WAV header parser, the resampler and
the voice-activity endpointer each keep only what the next chunk needs.
"""

from __future__ import annotations

import io
import struct
import wave
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy.signal import butter, sosfilt, sosfilt_zi

from llmos.errors import InvalidArgument

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
SAMPLE_WIDTH = 2  # bytes: 16-bit PCM
ACCEPTED = "16-bit PCM mono, raw LINEAR16 or WAV, at 8000-48000 Hz"

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# A header longer than this is not a WAV header we accept (fmt + a few metadata chunks).
_MAX_HEADER_BYTES = 64 * 1024


class Encoding(Enum):
    LINEAR16 = "linear16"
    WAV = "wav"


@dataclass(frozen=True)
class Clip:
    """Mono 16-bit samples at `sample_rate`."""

    samples: np.ndarray  # int16
    sample_rate: int

    @property
    def duration_ms(self) -> int:
        return len(self.samples) * 1000 // self.sample_rate


def check_sample_rate(sample_rate: int, field: str = "sample_rate_hertz") -> int:
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InvalidArgument(field, f"{sample_rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz; accepted: {ACCEPTED}")
    return sample_rate


def pcm_to_samples(data: bytes, field: str = "audio") -> np.ndarray:
    if len(data) % SAMPLE_WIDTH:
        raise InvalidArgument(field, f"{len(data)} bytes is not a whole number of 16-bit samples; accepted: {ACCEPTED}")
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def samples_to_pcm(samples: np.ndarray) -> bytes:
    return np.asarray(samples, dtype="<i2").tobytes()


def float_to_int16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


@dataclass(frozen=True)
class WavHeader:
    sample_rate: int
    data_offset: int  # bytes before the first sample
    data_bytes: int | None  # None: unknown or streaming (0 or 0xFFFFFFFF in the header)


def parse_wav_header(data: bytes, field: str = "audio") -> WavHeader | None:
    """The header of a WAV stream, or None while `data` is too short to hold all of it."""
    if len(data) < 12:
        if data and not (b"RIFF".startswith(data[:4]) or data[:4].startswith(b"RIFF")):
            raise InvalidArgument(field, f"not a WAV file (no RIFF header); accepted: {ACCEPTED}")
        return None
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InvalidArgument(field, f"not a WAV file (no RIFF/WAVE header); accepted: {ACCEPTED}")
    offset = 12
    sample_rate = 0
    while True:
        if offset + 8 > len(data):
            break
        chunk_id, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
        body = offset + 8
        if chunk_id == b"data":
            if not sample_rate:
                raise InvalidArgument(field, "WAV data chunk before its fmt chunk")
            return WavHeader(sample_rate, body, None if size in (0, 0xFFFFFFFF) else size)
        if body + size > len(data):
            break
        if chunk_id == b"fmt ":
            sample_rate = _check_fmt(data[body:body + size], field)
        offset = body + size + (size & 1)  # chunks are word-aligned
    if len(data) > _MAX_HEADER_BYTES:
        raise InvalidArgument(field, f"no WAV data chunk in the first {_MAX_HEADER_BYTES} bytes")
    return None


def _check_fmt(fmt: bytes, field: str) -> int:
    if len(fmt) < 16:
        raise InvalidArgument(field, "WAV fmt chunk is truncated")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]  # first two bytes of the sub-format GUID
    if tag != _WAVE_FORMAT_PCM:
        raise InvalidArgument(field, f"WAV format tag {tag:#06x} is not PCM; accepted: {ACCEPTED}")
    if bits != 16:
        raise InvalidArgument(field, f"{bits}-bit WAV is not supported; accepted: {ACCEPTED}")
    if channels != 1:
        raise InvalidArgument(field, f"{channels} channels: only mono is accepted; accepted: {ACCEPTED}")
    return check_sample_rate(rate, field)


def decode_clip(data: bytes, encoding: Encoding, sample_rate: int, field: str = "audio") -> Clip:
    """A whole clip: WAV (its header gives the rate) or LINEAR16 at `sample_rate`."""
    if not data:
        raise InvalidArgument(field, f"no audio; accepted: {ACCEPTED}")
    if encoding is Encoding.WAV:
        header = parse_wav_header(data, field)
        if header is None:
            raise InvalidArgument(field, f"WAV header is incomplete; accepted: {ACCEPTED}")
        end = len(data) if header.data_bytes is None else min(len(data), header.data_offset + header.data_bytes)
        payload = data[header.data_offset:end]
        payload = payload[: len(payload) - len(payload) % SAMPLE_WIDTH]
        samples = pcm_to_samples(payload, field)
        rate = header.sample_rate
    else:
        rate = check_sample_rate(sample_rate)
        samples = pcm_to_samples(data, field)
    if not len(samples):
        raise InvalidArgument(field, "the audio holds no samples")
    return Clip(samples, rate)


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(SAMPLE_WIDTH)
        out.setframerate(sample_rate)
        out.writeframes(samples_to_pcm(samples))
    return buffer.getvalue()


class PcmStream:
    """Turns audio chunks of a stream into samples; a WAV stream's header may span chunks."""

    def __init__(self, encoding: Encoding, sample_rate: int, field: str = "audio_content") -> None:
        self._field = field
        self._wav = encoding is Encoding.WAV
        self.sample_rate = 0 if self._wav else check_sample_rate(sample_rate)
        self._pending = b""  # header bytes not parsed yet, or half a sample

    def feed(self, chunk: bytes) -> np.ndarray:
        data = self._pending + chunk
        if self._wav and not self.sample_rate:
            header = parse_wav_header(data, self._field)
            if header is None:
                self._pending = data
                return np.zeros(0, np.int16)
            self.sample_rate = header.sample_rate
            data = data[header.data_offset:]
        whole = len(data) - len(data) % SAMPLE_WIDTH
        self._pending = data[whole:]
        return pcm_to_samples(data[:whole], self._field)


class Resampler:
    """Streaming sample-rate conversion: anti-alias low-pass, then linear interpolation.

    Filter state and the interpolation phase carry over between chunks, so a clip resampled
    whole or in pieces gives the same samples. Quality is what speech recognition and voice
    output need, not hi-fi.
    """

    def __init__(self, source_rate: int, target_rate: int) -> None:
        self.source_rate = source_rate
        self.target_rate = target_rate
        self._step = source_rate / target_rate
        self._sos = None
        if target_rate < source_rate:
            self._sos = butter(8, 0.45 * target_rate, fs=source_rate, output="sos")
            self._zi = sosfilt_zi(self._sos) * 0.0
        self._previous: float | None = None
        self._position = 0.0  # of the next output sample, in input samples after `_previous`

    def process(self, samples: np.ndarray) -> np.ndarray:
        if self.source_rate == self.target_rate:
            return np.asarray(samples, np.int16)
        signal = np.asarray(samples, np.float64)
        if self._sos is not None and len(signal):
            signal, self._zi = sosfilt(self._sos, signal, zi=self._zi)
        if self._previous is None:
            if not len(signal):
                return np.zeros(0, np.int16)
            buffer = signal
        else:
            buffer = np.concatenate(([self._previous], signal))
        last = len(buffer) - 1
        if self._position > last:
            positions = np.zeros(0)
        else:
            positions = np.arange(self._position, last + 1e-9, self._step)
        out = np.interp(positions, np.arange(len(buffer)), buffer)
        next_position = (positions[-1] + self._step) if len(positions) else self._position
        self._position = next_position - last
        self._previous = float(buffer[-1])
        return np.clip(np.round(out), -32768, 32767).astype(np.int16)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    return Resampler(source_rate, target_rate).process(samples)


@dataclass(frozen=True)
class EndpointConfig:
    """Voice-activity endpointing, Riva style.

    A segment starts when at least `start_threshold` of the frames in the last
    `start_history_ms` are voiced, and ends when at least `stop_threshold` of the frames in the
    last `stop_history_ms` are not. `max_segment_ms` cuts a segment that never pauses.
    """

    start_history_ms: int = 300
    start_threshold: float = 0.6
    stop_history_ms: int = 700
    stop_threshold: float = 0.9
    max_segment_ms: int = 30_000

    def overridden(
        self, start_history_ms: int = 0, start_threshold: float = 0.0, stop_history_ms: int = 0, stop_threshold: float = 0.0
    ) -> EndpointConfig:
        """This configuration with each non-zero argument in place of its field (a request's
        EndpointingConfig, whose zero fields mean "the default"), validated."""
        return EndpointConfig(
            start_history_ms=start_history_ms or self.start_history_ms,
            start_threshold=start_threshold or self.start_threshold,
            stop_history_ms=stop_history_ms or self.stop_history_ms,
            stop_threshold=stop_threshold or self.stop_threshold,
            max_segment_ms=self.max_segment_ms,
        ).validated()

    def validated(self) -> EndpointConfig:
        for name in ("start_history_ms", "stop_history_ms"):
            value = getattr(self, name)
            if not FRAME_MS <= value <= 10_000:
                raise InvalidArgument(f"endpointing.{name}", f"{value} ms is outside {FRAME_MS}-10000 ms")
        for name in ("start_threshold", "stop_threshold"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise InvalidArgument(f"endpointing.{name}", f"{value} is outside (0, 1]")
        return self


FRAME_MS = 30  # the voice-activity detector's frame


@dataclass(frozen=True)
class SpeechStart:
    start_ms: int  # from the start of the stream


@dataclass(frozen=True)
class SpeechAudio:
    samples: np.ndarray  # int16 at the endpointer's rate


@dataclass(frozen=True)
class SpeechEnd:
    end_ms: int


Event = SpeechStart | SpeechAudio | SpeechEnd


class Endpointer:
    """Cuts a 16 kHz stream into speech segments by voice activity.

    Frames are classified by PocketSphinx's WebRTC-derived VAD. A segment's audio includes the
    start window (so the first word is not clipped) and ends after the stop window. State is
    a few windows of frames, whatever the length of the stream.
    """

    SAMPLE_RATE = 16000

    def __init__(self, config: EndpointConfig, vad_mode: int = 2) -> None:
        from pocketsphinx import Vad  # the VAD is PocketSphinx's native one

        self.config = config.validated()
        self._vad = Vad(vad_mode, self.SAMPLE_RATE, FRAME_MS / 1000)
        self._frame = self._vad.frame_bytes // SAMPLE_WIDTH
        self._start_frames = max(1, config.start_history_ms // FRAME_MS)
        self._stop_frames = max(1, config.stop_history_ms // FRAME_MS)
        self._max_frames = max(self._start_frames + 1, config.max_segment_ms // FRAME_MS)
        self._pending = np.zeros(0, np.int16)
        self._start_window: deque[tuple[np.ndarray, bool]] = deque(maxlen=self._start_frames)
        self._stop_window: deque[bool] = deque(maxlen=self._stop_frames)
        self._frames_seen = 0
        self._segment_frames = 0
        self.in_speech = False

    @property
    def processed_ms(self) -> int:
        return self._frames_seen * FRAME_MS

    def process(self, samples: np.ndarray) -> Iterator[Event]:
        data = np.concatenate((self._pending, np.asarray(samples, np.int16)))
        whole = len(data) - len(data) % self._frame
        self._pending = data[whole:].copy()
        for start in range(0, whole, self._frame):
            yield from self._frame_events(data[start:start + self._frame])

    def _frame_events(self, frame: np.ndarray) -> Iterator[Event]:
        voiced = bool(self._vad.is_speech(samples_to_pcm(frame)))
        self._frames_seen += 1
        if not self.in_speech:
            self._start_window.append((frame, voiced))
            window_full = len(self._start_window) == self._start_frames
            if window_full and sum(v for _, v in self._start_window) >= self.config.start_threshold * self._start_frames:
                self.in_speech = True
                self._segment_frames = len(self._start_window)
                self._stop_window.clear()
                yield SpeechStart((self._frames_seen - len(self._start_window)) * FRAME_MS)
                yield SpeechAudio(np.concatenate([f for f, _ in self._start_window]))
                self._start_window.clear()
            return
        self._segment_frames += 1
        self._stop_window.append(voiced)
        yield SpeechAudio(frame)
        stop_full = len(self._stop_window) == self._stop_frames
        silent = stop_full and (self._stop_frames - sum(self._stop_window)) >= self.config.stop_threshold * self._stop_frames
        if silent or self._segment_frames >= self._max_frames:
            yield from self._end()

    def _end(self) -> Iterator[Event]:
        self.in_speech = False
        self._stop_window.clear()
        yield SpeechEnd(self._frames_seen * FRAME_MS)

    def flush(self) -> Iterator[Event]:
        """End of stream: close an open segment."""
        if self.in_speech:
            if len(self._pending):
                self._segment_frames += 1
                yield SpeechAudio(self._pending)
                self._pending = np.zeros(0, np.int16)
            yield from self._end()
