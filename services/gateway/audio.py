"""Uploaded audio in any container libsndfile reads (WAV, FLAC, OGG, MP3), as the mono 16-bit
samples the speech service takes."""

from __future__ import annotations

import io

import numpy as np
import soundfile

from llmos.audio import Clip, float_to_int16, resample
from llmos.errors import InvalidArgument

RECOGNITION_RATE = 16_000
FORMATS = "WAV, FLAC, OGG or MP3"


def decode_upload(data: bytes, max_seconds: float, field: str = "file") -> Clip:
    """Channels averaged (stereo down-mixed) and resampled to 16 kHz; refused past `max_seconds`
    before the samples are decoded."""
    if not data:
        raise InvalidArgument(field, f"the file is empty; send {FORMATS} audio")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            if sound.frames > max_seconds * sound.samplerate:
                raise InvalidArgument(
                    field, f"{sound.frames / sound.samplerate:.0f} s of audio is over the limit of {max_seconds:.0f} s"
                )
            samples = sound.read(dtype="float32", always_2d=True)
            rate = sound.samplerate
    except soundfile.LibsndfileError as exc:
        raise InvalidArgument(field, f"cannot decode the audio ({exc.error_string}); send {FORMATS}") from None
    if not len(samples):
        raise InvalidArgument(field, "the audio holds no samples")
    mono = float_to_int16(samples.mean(axis=1))
    return Clip(resample(mono, rate, RECOGNITION_RATE), RECOGNITION_RATE)


def pcm_bytes(samples: np.ndarray) -> bytes:
    return np.asarray(samples, dtype="<i2").tobytes()
