"""Speech recognition with PocketSphinx: a pool of decoders and endpointed streaming sessions.

Audio of any rate is resampled to 16 kHz and cut into speech segments by voice activity
(llmos.audio.Endpointer). A segment holds a decoder only while it lasts, so a long stream with
pauses shares the pool with other callers. Each segment gives interim hypotheses while it grows
and one final result, with word offsets in ms from the start of the stream, when it ends.

Language models: the general en-us trigram model that ships with PocketSphinx, and per tenant
a domain model built from its knowledge base (services.speech.domain). A domain decode whose
confidence falls under a threshold is decoded again with the general model and the more
confident of the two is kept (fallback by confidence).

The final result waits for the end of a segment (the stop window of silence, 700 ms by
default), but its decode need not: a segment is decoded up to CLOSING_SILENCE_MS after its last
speech, and once that much silence has followed the speech, the segment so far is decoded on a
free decoder in the background. If the segment then ends with no more speech, that decode is
its final result, ready or nearly so when the end is detected; speech before the end throws it
away. Either way the same audio is decoded, so the result does not depend on a free decoder.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pocketsphinx import Decoder, NGramModel, Vad

from llmos.audio import FRAME_MS, Endpointer, EndpointConfig, Resampler, SpeechAudio, SpeechEnd, SpeechStart, samples_to_pcm
from llmos.errors import ResourceExhausted

SAMPLE_RATE = Endpointer.SAMPLE_RATE
FRAMES_PER_S = 100  # PocketSphinx's feature frame rate
GENERAL = "general"
DOMAIN = "domain"
# Silence after the last speech that a segment's final decode includes, and after which that
# decode starts in the background: shorter than the stop window, long enough that most pauses
# between words do not start one.
CLOSING_SILENCE_MS = 250
# A longer segment is not decoded speculatively: each pause would decode it all again.
MAX_SPECULATIVE_SEGMENT_MS = 15_000
# Words of the decoder's output that are not words of the transcript.
_FILLERS = ("<s>", "</s>", "<sil>", "[NOISE]", "[SPEECH]", "[BREATH]", "[COUGH]", "[UH]", "[UM]")


@dataclass(frozen=True)
class Word:
    word: str
    start_ms: int
    end_ms: int
    confidence: float


@dataclass(frozen=True)
class Recognition:
    transcript: str
    confidence: float
    words: tuple[Word, ...]
    is_final: bool
    stability: float
    audio_processed_ms: int
    model: str = GENERAL


def _clean(word: str) -> str:
    """`word(2)` is the second pronunciation of `word`."""
    return word.split("(", 1)[0]


def _search_name(tenant: str) -> str:
    return "domain_" + hashlib.sha256(tenant.encode("utf-8")).hexdigest()[:16]


@dataclass
class _PooledDecoder:
    decoder: Decoder
    general_search: str
    # Domain models loaded into this decoder: search name -> version (the ARPA file's mtime).
    loaded: dict[str, int] = field(default_factory=dict)


class AsrEngine:
    """The decoders of one process and the domain models they may use."""

    def __init__(self, decoders: int, acquire_timeout_s: float, domain_min_confidence: float) -> None:
        self._pool: queue.Queue[_PooledDecoder] = queue.Queue()
        for _ in range(decoders):
            decoder = Decoder(loglevel="FATAL")
            self._pool.put(_PooledDecoder(decoder, decoder.current_search()))
        self._acquire_timeout_s = acquire_timeout_s
        self.domain_min_confidence = domain_min_confidence
        self._domain_models: dict[str, tuple[Path, int]] = {}  # search name -> (path, version)
        self._lock = threading.Lock()

    def set_domain_model(self, tenant: str, path: Path | None) -> None:
        """Use the ARPA model at `path` for `tenant` from the next segment on (None: forget it)."""
        name = _search_name(tenant)
        with self._lock:
            if path is None:
                self._domain_models.pop(name, None)
            else:
                self._domain_models[name] = (path, path.stat().st_mtime_ns)

    def has_domain_model(self, tenant: str) -> bool:
        with self._lock:
            return _search_name(tenant) in self._domain_models

    @contextmanager
    def decoder(self, tenant: str | None, wait: bool = True) -> Iterator[tuple[Decoder, str, str | None]]:
        """A decoder for one segment, its general search, and `tenant`'s domain search (or None).
        `wait` False: only a decoder free now (else ResourceExhausted at once)."""
        try:
            pooled = self._pool.get(timeout=self._acquire_timeout_s) if wait else self._pool.get_nowait()
        except queue.Empty:
            raise ResourceExhausted("every speech decoder is busy", retry_after_s=1.0) from None
        try:
            yield pooled.decoder, pooled.general_search, self._sync_domain(pooled, tenant) if tenant else None
        finally:
            self._pool.put(pooled)

    def _sync_domain(self, pooled: _PooledDecoder, tenant: str) -> str | None:
        name = _search_name(tenant)
        with self._lock:
            model = self._domain_models.get(name)
        if model is None:
            return None
        path, version = model
        if pooled.loaded.get(name) != version:
            decoder = pooled.decoder
            lm = NGramModel(decoder.config, decoder.logmath, str(path))
            decoder.add_lm(name, lm)
            pooled.loaded[name] = version
        return name


def _decode(decoder: Decoder, search: str, audio: np.ndarray) -> tuple[str, float, list[tuple[str, int, int, float]]]:
    """Decode a whole segment with `search`: (text, confidence, [(word, start frame, end frame, conf)])."""
    decoder.activate_search(search)
    decoder.start_utt()
    decoder.process_raw(samples_to_pcm(audio), full_utt=True)
    decoder.end_utt()
    return _result(decoder)


# A segment's final decode: text, confidence, [(word, start frame, end frame, confidence)], model.
FinalDecode = tuple[str, float, list[tuple[str, int, int, float]], str]


def _final_decode(
    decoder: Decoder, general: str, domain: str | None, audio: np.ndarray, min_confidence: float
) -> FinalDecode:
    """A whole segment decoded with the domain model if any, else (or when that is not confident
    enough and the general model is more so) the general one: (text, confidence, words, model)."""
    text, confidence, words = _decode(decoder, domain or general, audio)
    model = DOMAIN if domain else GENERAL
    if domain and confidence < min_confidence:
        general_result = _decode(decoder, general, audio)
        if general_result[1] > confidence:
            (text, confidence, words), model = general_result, GENERAL
    return text, confidence, words, model


class _Speculation:
    """A segment's final decode, run in a background thread (on a decoder free at the time)."""

    def __init__(self, decode: Callable[[], FinalDecode | None]) -> None:
        self._decode = decode
        self._result: FinalDecode | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, name="asr-speculation", daemon=True).start()

    def _run(self) -> None:
        try:
            self._result = self._decode()
        finally:
            self._done.set()

    def result(self) -> FinalDecode | None:
        """The decode, waited for; None when it failed or found no free decoder."""
        self._done.wait()
        return self._result


def _result(decoder: Decoder) -> tuple[str, float, list[tuple[str, int, int, float]]]:
    hyp = decoder.hyp()
    if hyp is None:
        return "", 0.0, []
    # seg().prob is the word's posterior probability from the lattice, 0..1.
    words = [
        (_clean(seg.word), seg.start_frame, seg.end_frame, float(seg.prob))
        for seg in decoder.seg()
        if seg.word not in _FILLERS and not seg.word.startswith("++")
    ]
    confidence = float(np.mean([w[3] for w in words])) if words else 0.0
    return hyp.hypstr, confidence, words


class StreamingRecognizer:
    """One recognition stream: feed audio at its own rate, get interim and final results.

    Not thread-safe; the service drives it from one worker thread at a time.
    """

    def __init__(
        self,
        engine: AsrEngine,
        source_rate: int,
        endpointing: EndpointConfig,
        *,
        tenant: str | None = None,
        interim_results: bool = False,
        interim_interval_ms: int = 300,
        vad_mode: int = 2,
        speculate: bool = True,
    ) -> None:
        """`speculate`: decode a segment in its closing silence (a live stream); off when the
        whole audio is at hand, where the end follows at once."""
        self._engine = engine
        self._speculate_finals = speculate
        self._tenant = tenant
        self._resampler = Resampler(source_rate, SAMPLE_RATE)
        self._endpointer = Endpointer(endpointing, vad_mode)
        self._interim_results = interim_results
        self._interim_samples = interim_interval_ms * SAMPLE_RATE // 1000
        self._segment: list[np.ndarray] = []
        self._segment_start_ms = 0
        self._since_interim = 0
        self._previous_interim: list[str] = []
        self._held = ExitStack()
        self._decoder: Decoder | None = None
        self._general = ""
        self._domain_search: str | None = None
        self._vad = Vad(vad_mode, SAMPLE_RATE, FRAME_MS / 1000)
        self._frame = self._vad.frame_bytes // 2
        self._silent_ms = 0  # unvoiced audio since the segment's last voiced frame
        self._samples = 0  # in the segment so far
        self._closing: int | None = None  # samples of the segment up to its closing silence, once heard
        self._speculation: _Speculation | None = None

    @property
    def processed_ms(self) -> int:
        return self._endpointer.processed_ms

    def feed(self, samples: np.ndarray) -> list[Recognition]:
        results: list[Recognition] = []
        for event in self._endpointer.process(self._resampler.process(samples)):
            result = self._on_event(event)
            if result is not None:
                results.append(result)
        return results

    def finish(self) -> list[Recognition]:
        """End of the stream: close the open segment, if any."""
        results = [r for r in (self._on_event(e) for e in self._endpointer.flush()) if r is not None]
        self._release()
        return results

    def close(self) -> None:
        """Give the decoder back without a result (the caller went away)."""
        self._release()

    def _on_event(self, event: SpeechStart | SpeechAudio | SpeechEnd) -> Recognition | None:
        if isinstance(event, SpeechStart):
            self._begin(event.start_ms)
            return None
        if isinstance(event, SpeechAudio):
            return self._audio(event.samples)
        return self._end()

    def _begin(self, start_ms: int) -> None:
        self._segment = []
        self._segment_start_ms = start_ms
        self._since_interim = 0
        self._previous_interim = []
        self._silent_ms = 0
        self._samples = 0
        self._closing = None
        self._speculation = None
        if self._interim_results:
            self._acquire()
            assert self._decoder is not None
            self._decoder.activate_search(self._domain_search or self._general)
            self._decoder.start_utt()

    def _acquire(self) -> None:
        self._decoder, self._general, self._domain_search = self._held.enter_context(self._engine.decoder(self._tenant))

    def _audio(self, samples: np.ndarray) -> Recognition | None:
        self._segment.append(samples)
        self._speculate(samples)
        if self._decoder is None:
            return None
        self._decoder.process_raw(samples_to_pcm(samples), full_utt=False)
        self._since_interim += len(samples)
        if self._since_interim < self._interim_samples:
            return None
        self._since_interim = 0
        hyp = self._decoder.hyp()
        words = hyp.hypstr.split() if hyp is not None else []
        if not words:
            return None
        agreed = 0
        for old, new in zip(self._previous_interim, words):
            if old != new:
                break
            agreed += 1
        # Stability: the share of this hypothesis that the previous one already had; words that
        # survive another interval of audio rarely change in the final.
        stability = agreed / len(words)
        self._previous_interim = words
        return Recognition(" ".join(words), 0.0, (), False, stability, self.processed_ms)

    def _speculate(self, samples: np.ndarray) -> None:
        """Track the silence after the speech; once CLOSING_SILENCE_MS of it are heard, decode the
        segment so far in the background. Speech again throws that decode away (its thread frees
        its decoder) and the segment goes on."""
        self._samples += len(samples)
        if len(samples) != self._frame:
            self._silent_ms = 0  # the start window (many frames, speech) or a stream's last scrap
        elif self._vad.is_speech(samples_to_pcm(samples)):
            self._silent_ms = 0
            self._closing = None
            self._speculation = None
        else:
            self._silent_ms += FRAME_MS
        if self._closing is None and self._silent_ms >= CLOSING_SILENCE_MS:
            self._closing = self._samples
            if not self._speculate_finals or self._samples > MAX_SPECULATIVE_SEGMENT_MS * SAMPLE_RATE // 1000:
                return
            audio = np.concatenate(self._segment)
            engine, tenant = self._engine, self._tenant

            def decode() -> FinalDecode | None:
                try:
                    with engine.decoder(tenant, wait=False) as (decoder, general, domain):
                        return _final_decode(decoder, general, domain, audio, engine.domain_min_confidence)
                except ResourceExhausted:
                    return None  # no decoder free: the segment is decoded when it ends, as usual

            self._speculation = _Speculation(decode)

    def _end(self) -> Recognition:
        """The final result of a segment: the whole segment decoded at once.

        Live decoding (for interim results) normalizes features with a running estimate; a
        whole-segment decode normalizes over the segment and is more accurate, so finals come
        from it whether or not interim results were asked for. It covers the segment up to its
        closing silence; the speculative decode of that audio, when there is one, is that decode.
        """
        speculated = self._speculation.result() if self._speculation is not None else None
        self._speculation = None
        if speculated is not None:
            if self._decoder is not None:
                self._decoder.end_utt()
            text, confidence, words, model = speculated
        else:
            if self._decoder is None:
                self._acquire()
            else:
                self._decoder.end_utt()
            decoder = self._decoder
            assert decoder is not None
            audio = np.concatenate(self._segment) if self._segment else np.zeros(0, np.int16)
            if self._closing is not None and self._speculate_finals:
                # A live segment's final covers what its speculative decode would have: the
                # silence after the closing silence is not decoded. A whole clip keeps all of it
                # (trimmed, "gift cards are valid for three years" came back "... advantage for two years").
                audio = audio[:self._closing]
            text, confidence, words, model = _final_decode(
                decoder, self._general, self._domain_search, audio, self._engine.domain_min_confidence
            )
        self._release()
        return Recognition(" ".join(w[0] for w in words) if words else text, confidence,
                           self._offsets(words), True, 1.0, self.processed_ms, model)

    def _offsets(self, words: list[tuple[str, int, int, float]]) -> tuple[Word, ...]:
        """Word times in ms from the start of the stream: monotonic, inside the audio seen."""
        limit = self.processed_ms
        out: list[Word] = []
        cursor = self._segment_start_ms
        for text, start_frame, end_frame, conf in words:
            start = min(limit, max(cursor, self._segment_start_ms + start_frame * 1000 // FRAMES_PER_S))
            end = min(limit, max(start, self._segment_start_ms + (end_frame + 1) * 1000 // FRAMES_PER_S))
            out.append(Word(text, start, end, conf))
            cursor = end
        return tuple(out)

    def _release(self) -> None:
        self._held.close()
        self._decoder = None
        self._segment = []


def recognize_clip(engine: AsrEngine, samples: np.ndarray, sample_rate: int, endpointing: EndpointConfig,
                   tenant: str | None = None, vad_mode: int = 2) -> list[Recognition]:
    """Final results of a whole clip, one per speech segment."""
    recognizer = StreamingRecognizer(engine, sample_rate, endpointing, tenant=tenant, vad_mode=vad_mode, speculate=False)
    try:
        return recognizer.feed(samples) + recognizer.finish()
    finally:
        recognizer.close()

