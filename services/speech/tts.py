"""Speech synthesis: Kokoro-82M (int8 ONNX) with espeak-ng phonemes, and espeak-ng itself.

English text becomes IPA with espeak-ng, then the phoneme set Kokoro v1.0 was trained on
(misaki's: diphthongs as single letters, no length marks); Kokoro turns phonemes and a voice's
style vector into 24 kHz audio. espeak-ng also speaks on its own: robotic but instant, the
fallback voice. Text is spoken piece by piece (llmos.utterances: the first clause, then
sentences) so streaming callers hear the first one while the rest is computed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from llmos.audio import Encoding, decode_clip
from llmos.errors import FailedPrecondition, InvalidArgument

KOKORO_RATE = 24000
KOKORO_MAX_TOKENS = 510  # the model's context, less the two boundary tokens
ESPEAK = "espeak-ng"
ESPEAK_LANGUAGE = "en-us"

# espeak-ng IPA -> misaki phonemes, longest first (after the misaki/kokoro espeak fallback).
_IPA_TO_KOKORO = (
    ("ʔn̩", "tᵊn"), ("ʔ", "t"), ("aɪ", "I"), ("aʊ", "W"), ("dʒ", "ʤ"), ("eɪ", "A"), ("tʃ", "ʧ"),
    ("ɔɪ", "Y"), ("oʊ", "O"), ("əl", "ᵊl"), ("ɜːɹ", "ɜɹ"), ("ɜː", "ɜɹ"), ("ɪə", "iə"),
    ("ʲ", ""), ("r", "ɹ"), ("x", "k"), ("ç", "k"), ("ɐ", "ə"), ("ɬ", "l"), ("ː", ""), ("\u0329", ""),
)
# A piece's final punctuation sets its intonation: a first clause ending in a comma stays open.
_PIECE_END = re.compile(r"[.!?,;:]+[\"')\]]*$")


def espeak_ipa(text: str, language: str = ESPEAK_LANGUAGE) -> list[str]:
    """IPA of `text` from espeak-ng, one string per clause."""
    result = subprocess.run(
        [ESPEAK, "-q", "--ipa", "-v", language, "--", text], capture_output=True, text=True, check=True, timeout=30
    )
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def kokoro_phonemes(ipa_clauses: list[str], ending: str) -> str:
    clauses = []
    for clause in ipa_clauses:
        for source, target in _IPA_TO_KOKORO:
            clause = clause.replace(source, target)
        clauses.append(clause)
    return ", ".join(clauses) + ending


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    language_code: str
    engine: str
    sample_rate: int


class SpeechRun:
    """One utterance being spoken; `stop()` from any thread ends a Kokoro inference between two
    of its operators, so a cancelled request stops using the CPU within milliseconds."""

    def __init__(self) -> None:
        import onnxruntime as ort

        self.options = ort.RunOptions()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        self.options.terminate = True


class Voice(Protocol):
    info: VoiceInfo

    def speak(self, sentence: str, speed: float, run: SpeechRun | None = None) -> np.ndarray:
        """int16 samples at `info.sample_rate`."""
        ...


class KokoroModel:
    """The ONNX session and the voices' style vectors, shared by every Kokoro voice."""

    def __init__(self, folder: Path, providers: list[str], threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # ONNX Runtime's own default is one thread per physical core: one on a two-vCPU machine,
        # where two threads speak a short sentence about 30% sooner.
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        # Idle worker threads would spin waiting for the next operator, taking the CPU the
        # recognizer and the language model need on a small machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=providers)
        self._vocab: dict[str, int] = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        with np.load(folder / "voices.npz") as voices:
            self.styles = {name: voices[name].astype(np.float32) for name in voices.files}

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def tokens(self, phonemes: str) -> list[int]:
        return [self._vocab[c] for c in phonemes if c in self._vocab]

    def synthesize(self, tokens: list[int], voice: str, speed: float, run: SpeechRun | None = None) -> np.ndarray:
        styles = self.styles[voice]
        audio = self._session.run(None, {
            "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
            "style": styles[min(len(tokens), len(styles)) - 1].reshape(1, -1),
            "speed": np.array([speed], dtype=np.float32),
        }, run.options if run is not None else None)[0]
        return np.asarray(audio, np.float32).ravel()

    def warm_up(self) -> None:
        """One short inference at start: the first run allocates its buffers, not a caller's."""
        self.synthesize(self.tokens("hˈI."), next(iter(self.styles)), 1.0)


class KokoroVoice:
    def __init__(self, model: KokoroModel, name: str) -> None:
        self._model = model
        self._name = name
        self.info = VoiceInfo(name, "en-US", "kokoro", KOKORO_RATE)

    def speak(self, sentence: str, speed: float, run: SpeechRun | None = None) -> np.ndarray:
        ending = match.group(0)[0] if (match := _PIECE_END.search(sentence)) else "."
        tokens = self._model.tokens(kokoro_phonemes(espeak_ipa(sentence), ending))
        pieces = [tokens[i:i + KOKORO_MAX_TOKENS] for i in range(0, len(tokens), KOKORO_MAX_TOKENS)]
        audio = np.concatenate(
            [self._model.synthesize(p, self._name, speed, run) for p in pieces if p] or [np.zeros(0, np.float32)]
        )
        return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


class EspeakVoice:
    """espeak-ng's own formant voice: the fast fallback."""

    RATE_WPM = 175  # espeak-ng's default speaking rate

    def __init__(self, language: str = ESPEAK_LANGUAGE) -> None:
        self._language = language
        self.info = VoiceInfo(f"espeak-{language}", "en-US" if language == "en-us" else "en-GB", "espeak-ng", 22050)

    def speak(self, sentence: str, speed: float, run: SpeechRun | None = None) -> np.ndarray:
        result = subprocess.run(
            [ESPEAK, "--stdout", "-v", self._language, "-s", str(int(self.RATE_WPM * speed)), "--", sentence],
            capture_output=True, check=True, timeout=60,
        )
        return decode_clip(result.stdout, Encoding.WAV, 0, "espeak-ng output").samples


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


class VoiceCatalog:
    """The voices this process can speak with, by name."""

    def __init__(self, voices: list[Voice], default: str) -> None:
        self._voices = {voice.info.name: voice for voice in voices}
        if not self._voices:
            raise FailedPrecondition(f"no voice available: install {ESPEAK} (apt-get install espeak-ng)")
        self.default = default if default in self._voices else next(iter(self._voices))

    def get(self, name: str) -> Voice:
        voice = self._voices.get(name or self.default)
        if voice is None:
            raise InvalidArgument("voice_name", f"unknown voice {name!r}; known: {', '.join(self._voices)}")
        return voice

    def list(self, language_code: str = "") -> list[VoiceInfo]:
        wanted = language_code.lower()
        return [v.info for v in self._voices.values() if not wanted or v.info.language_code.lower().startswith(wanted)]
