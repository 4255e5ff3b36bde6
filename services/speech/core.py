"""Speech logic shared by the gRPC API and the bus handlers.

Recognition: requests are validated, audio decoded and resampled, cut by voice activity and
decoded by PocketSphinx (services.speech.asr) in worker threads, so the event loop keeps
serving. Synthesis: text is split into sentences and each is spoken by a voice
(services.speech.tts) in a worker thread, resampled and encoded as asked. Every final
transcript goes out on `llmos.speech.recognized`, every utterance on `llmos.speech.synthesized`.
Domain language models are (re)built per tenant when its documents are indexed or deleted,
debounced (services.speech.domain.CoalescedRebuilds), for the tenants the policy names.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from llmos.audio import (
    Encoding,
    EndpointConfig,
    PcmStream,
    Resampler,
    check_sample_rate,
    decode_clip,
    encode_wav,
    samples_to_pcm,
)
from llmos.audit import AuditLog
from llmos.auth import Principal
from llmos.bus.subjects import SPEECH_RECOGNIZED, SPEECH_SYNTHESIZED
from llmos.utterances import split_for_speech
from llmos.errors import FailedPrecondition, InvalidArgument
from llmos.ports import Publisher
from llmos.v1 import events_pb2, speech_pb2
from services.speech.asr import DOMAIN, GENERAL, AsrEngine, Recognition, StreamingRecognizer, recognize_clip
from services.speech.domain import CoalescedRebuilds, DomainCorpus, DomainModelPolicy
from services.speech.tts import SpeechRun, VoiceCatalog

logger = logging.getLogger(__name__)

LANGUAGES = ("en-us", "en")
MIN_SPEED, MAX_SPEED = 0.5, 2.0
AUTO = ""  # model: the tenant's domain model when it has one, else the general model
DocumentText = Callable[[str, str], Awaitable[str]]  # (tenant, document id) -> its text


@dataclass(frozen=True)
class RecognitionLimits:
    max_clip_s: float
    interim_interval_ms: int
    vad_mode: int
    endpointing: EndpointConfig


def _encoding(value: int, audio: bytes = b"") -> Encoding:
    if value == speech_pb2.AUDIO_ENCODING_WAV or (value == speech_pb2.AUDIO_ENCODING_UNSPECIFIED and audio[:4] == b"RIFF"):
        return Encoding.WAV
    if value in (speech_pb2.AUDIO_ENCODING_LINEAR_PCM, speech_pb2.AUDIO_ENCODING_UNSPECIFIED):
        return Encoding.LINEAR16
    raise InvalidArgument("encoding", f"unknown encoding {value}; accepted: LINEAR_PCM, WAV")


def _check_language(language_code: str) -> None:
    if language_code and language_code.lower() not in LANGUAGES:
        raise InvalidArgument("language_code", f"{language_code!r} is not supported; accepted: en-US")


def _proto_result(result: Recognition, word_offsets: bool) -> speech_pb2.SpeechRecognitionResult:
    words = [
        speech_pb2.WordInfo(word=w.word, start_ms=w.start_ms, end_ms=w.end_ms, confidence=w.confidence)
        for w in result.words
    ] if word_offsets else []
    return speech_pb2.SpeechRecognitionResult(
        alternatives=[speech_pb2.SpeechRecognitionAlternative(transcript=result.transcript, confidence=result.confidence, words=words)],
        is_final=result.is_final,
        stability=result.stability,
        audio_processed_ms=result.audio_processed_ms,
    )


class _Stream:
    """A recognizer driven from worker threads one call at a time (the lock orders them)."""

    def __init__(self, recognizer: StreamingRecognizer) -> None:
        self._recognizer = recognizer
        self._lock = threading.Lock()

    def _locked(self, call: Callable[[], list[Recognition]]) -> list[Recognition]:
        with self._lock:
            return call()

    async def feed(self, samples: np.ndarray) -> list[Recognition]:
        return await asyncio.to_thread(self._locked, lambda: self._recognizer.feed(samples))

    async def finish(self) -> list[Recognition]:
        return await asyncio.to_thread(self._locked, self._recognizer.finish)

    async def close(self) -> None:
        await asyncio.to_thread(self._locked, lambda: (self._recognizer.close(), [])[1])


class SpeechCore:
    def __init__(
        self,
        publisher: Publisher,
        audit: AuditLog,
        engine: AsrEngine,
        corpus: DomainCorpus,
        voices: VoiceCatalog,
        limits: RecognitionLimits,
        max_text_chars: int,
        document_text: DocumentText,
        domain_policy: DomainModelPolicy = DomainModelPolicy(),
    ) -> None:
        self._publisher = publisher
        self._audit = audit
        self._engine = engine
        self._corpus = corpus
        self._voices = voices
        self._limits = limits
        self._max_text_chars = max_text_chars
        self._document_text = document_text
        self._rebuild_locks: dict[str, asyncio.Lock] = {}
        self._domain_policy = domain_policy
        self._rebuilds = CoalescedRebuilds(self._rebuild, domain_policy.settle_s)
        self._publishes: set[asyncio.Task[None]] = set()  # recognition events still being published

    # -- recognition ----------------------------------------------------------------------

    async def _domain_tenant(self, tenant: str, model: str) -> str | None:
        """The tenant whose domain model to use, or None for the general model."""
        if model == GENERAL:
            return None
        if model not in (AUTO, DOMAIN):
            raise InvalidArgument("model", f"{model!r} is not a model; accepted: general, domain, or empty for automatic")
        if not self._domain_policy.builds_for(tenant):
            if model == DOMAIN:
                raise FailedPrecondition(
                    f"tenant {tenant!r} has no domain language model: domain models are off for it "
                    "(LLMOS_SPEECH_DOMAIN_LM_TENANTS / LLMOS_SPEECH_DOMAIN_LM_EXCLUDE); ask for model 'general'"
                )
            return None
        if not self._engine.has_domain_model(tenant):
            path = self._corpus.model_path(tenant)
            if path is None and self._corpus.has_text(tenant):
                await self._rebuild(tenant)  # its model was built with other settings
            elif path is not None:
                self._engine.set_domain_model(tenant, path)
            elif model == DOMAIN:
                raise FailedPrecondition(
                    f"tenant {tenant!r} has no domain language model yet: it is built from the tenant's "
                    "indexed documents (or LLMOS_SPEECH_DOMAIN_SEED); ask for model 'general' meanwhile"
                )
        return tenant if self._engine.has_domain_model(tenant) else None

    def _endpointing(self, config: speech_pb2.EndpointingConfig | None) -> EndpointConfig:
        if config is None:
            return self._limits.endpointing
        return self._limits.endpointing.overridden(
            config.start_history_ms, config.start_threshold, config.stop_history_ms, config.stop_threshold
        )

    async def recognize(self, principal: Principal, tenant: str, request: speech_pb2.RecognizeRequest) -> speech_pb2.RecognizeResponse:
        config = request.config
        _check_language(config.language_code)
        clip = decode_clip(request.audio, _encoding(config.encoding, request.audio), config.sample_rate_hertz)
        seconds = len(clip.samples) / clip.sample_rate
        if seconds > self._limits.max_clip_s:
            raise InvalidArgument(
                "audio", f"{seconds:.0f} s is longer than the {self._limits.max_clip_s:.0f} s limit of Recognize; use StreamingRecognize"
            )
        domain = await self._domain_tenant(tenant, config.model)
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        results = await asyncio.to_thread(
            recognize_clip, self._engine, clip.samples, clip.sample_rate, self._limits.endpointing, domain, self._limits.vad_mode
        )
        await self._recognized(tenant, request_id, results, clip.duration_ms, started)
        await self._audit.record(principal, tenant, "speech/recognize", f"request/{request_id}")
        return speech_pb2.RecognizeResponse(results=[_proto_result(r, config.enable_word_time_offsets) for r in results])

    async def streaming_recognize(
        self, principal: Principal, tenant: str, config: speech_pb2.StreamingRecognitionConfig, audio: AsyncIterator[bytes]
    ) -> AsyncIterator[speech_pb2.StreamingRecognizeResponse]:
        """Interim and final results as the audio arrives; the first chunk may be a WAV header."""
        recognition = config.config
        _check_language(recognition.language_code)
        encoding = _encoding(recognition.encoding)
        pcm = PcmStream(encoding, recognition.sample_rate_hertz)
        endpointing = self._endpointing(config.endpointing if config.HasField("endpointing") else None)
        domain = await self._domain_tenant(tenant, recognition.model)
        request_id = uuid.uuid4().hex
        await self._audit.record(principal, tenant, "speech/streaming-recognize", f"request/{request_id}")
        stream: _Stream | None = None
        started = time.perf_counter()
        try:
            async for chunk in audio:
                samples = pcm.feed(chunk)
                if stream is None:
                    if not pcm.sample_rate:
                        continue  # the WAV header is still arriving
                    stream = _Stream(StreamingRecognizer(
                        self._engine, pcm.sample_rate, endpointing, tenant=domain,
                        interim_results=config.interim_results,
                        interim_interval_ms=self._limits.interim_interval_ms, vad_mode=self._limits.vad_mode,
                    ))
                results = await stream.feed(samples)
                if results:
                    published = self._publishing(tenant, request_id, results, started)
                    yield speech_pb2.StreamingRecognizeResponse(
                        results=[_proto_result(r, recognition.enable_word_time_offsets) for r in results]
                    )
                    await published
            if stream is None:
                raise InvalidArgument("audio_content", "the stream ended before any audio")
            results = await stream.finish()
            if results:
                published = self._publishing(tenant, request_id, results, started)
                yield speech_pb2.StreamingRecognizeResponse(
                    results=[_proto_result(r, recognition.enable_word_time_offsets) for r in results]
                )
                await published
        finally:
            if stream is not None:
                await asyncio.shield(stream.close())

    def _publishing(self, tenant: str, request_id: str, results: list[Recognition], started: float) -> asyncio.Task[None]:
        """The final results' events, published while their response goes out: the caller (a voice
        turn waiting on its transcript) does not wait for the bus. The task is kept until it is
        done, so a caller who hangs up meanwhile does not lose the events."""
        task = asyncio.create_task(self._recognized(tenant, request_id, results, 0, started))
        self._publishes.add(task)
        task.add_done_callback(self._publishes.discard)
        return task

    async def _recognized(self, tenant: str, request_id: str, results: list[Recognition], audio_ms: int, started: float) -> None:
        for index, result in enumerate(r for r in results if r.is_final):
            event = events_pb2.SpeechRecognized(
                request_id=request_id,
                tenant=tenant,
                transcript=result.transcript,
                confidence=result.confidence,
                audio_ms=audio_ms or result.audio_processed_ms,
                processing_ms=(time.perf_counter() - started) * 1000,
            )
            await self._publisher.publish(SPEECH_RECOGNIZED, event, msg_id=f"{request_id}/{result.audio_processed_ms}/{index}")

    # -- synthesis ------------------------------------------------------------------------

    async def synthesize_stream(
        self, principal: Principal, tenant: str, request: speech_pb2.SynthesizeSpeechRequest
    ) -> AsyncIterator[speech_pb2.SynthesizeSpeechResponse]:
        """One response per piece (the first clause, then sentences), as soon as it is spoken."""
        text = request.text.strip()
        if not text:
            raise InvalidArgument("text", "nothing to say")
        if len(text) > self._max_text_chars:
            raise InvalidArgument("text", f"{len(text)} characters is over the limit of {self._max_text_chars}")
        _check_language(request.language_code)
        voice = self._voices.get(request.voice_name)
        speed = request.speed or 1.0
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise InvalidArgument("speed", f"{speed} is outside {MIN_SPEED}-{MAX_SPEED}")
        rate = check_sample_rate(request.sample_rate_hz, "sample_rate_hz") if request.sample_rate_hz else voice.info.sample_rate
        if request.encoding not in (speech_pb2.AUDIO_ENCODING_UNSPECIFIED, speech_pb2.AUDIO_ENCODING_LINEAR_PCM, speech_pb2.AUDIO_ENCODING_WAV):
            raise InvalidArgument("encoding", f"unknown encoding {request.encoding}; accepted: LINEAR_PCM, WAV")
        wav = request.encoding == speech_pb2.AUDIO_ENCODING_WAV
        resampler = Resampler(voice.info.sample_rate, rate)
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        audio_ms = 0
        for sentence in split_for_speech(text) or [text]:
            run = SpeechRun()
            try:
                spoken = await asyncio.to_thread(voice.speak, sentence, speed, run)
            except asyncio.CancelledError:
                run.stop()  # the caller went away (or barged in): free the CPU now
                raise
            samples = resampler.process(spoken)
            duration_ms = len(samples) * 1000 // rate
            audio_ms += duration_ms
            yield speech_pb2.SynthesizeSpeechResponse(
                audio=encode_wav(samples, rate) if wav else samples_to_pcm(samples),
                encoding=speech_pb2.AUDIO_ENCODING_WAV if wav else speech_pb2.AUDIO_ENCODING_LINEAR_PCM,
                sample_rate_hz=rate,
                duration_ms=duration_ms,
                text=sentence,
            )
        event = events_pb2.SpeechSynthesized(
            request_id=request_id, tenant=tenant, voice=voice.info.name, characters=len(text),
            audio_ms=audio_ms, processing_ms=(time.perf_counter() - started) * 1000,
        )
        await self._publisher.publish(SPEECH_SYNTHESIZED, event, msg_id=request_id)
        await self._audit.record(principal, tenant, "speech/synthesize", f"request/{request_id}")

    async def synthesize(
        self, principal: Principal, tenant: str, request: speech_pb2.SynthesizeSpeechRequest
    ) -> speech_pb2.SynthesizeSpeechResponse:
        """The whole utterance in one response (the sentences of the stream, joined)."""
        pieces = [piece async for piece in self.synthesize_stream(principal, tenant, _as_pcm(request))]
        rate = pieces[0].sample_rate_hz
        pcm = b"".join(piece.audio for piece in pieces)
        wav = request.encoding == speech_pb2.AUDIO_ENCODING_WAV
        return speech_pb2.SynthesizeSpeechResponse(
            audio=encode_wav(np.frombuffer(pcm, "<i2"), rate) if wav else pcm,
            encoding=speech_pb2.AUDIO_ENCODING_WAV if wav else speech_pb2.AUDIO_ENCODING_LINEAR_PCM,
            sample_rate_hz=rate,
            duration_ms=sum(piece.duration_ms for piece in pieces),
            text=request.text,
        )

    def voices(self, language_code: str) -> speech_pb2.ListVoicesResponse:
        return speech_pb2.ListVoicesResponse(voices=[
            speech_pb2.Voice(name=v.name, language_code=v.language_code, engine=v.engine, sample_rate_hz=v.sample_rate)
            for v in self._voices.list(language_code)
        ])

    # -- domain models --------------------------------------------------------------------

    async def seed(self, tenant: str, documents: list[tuple[str, str]]) -> None:
        """Add text given at start (articles, intents) to `tenant`'s domain model."""
        changed = [self._corpus.put(tenant, key, text) for key, text in documents]
        if any(changed) or self._corpus.model_path(tenant) is None:
            await self._rebuild(tenant)
        else:
            self._engine.set_domain_model(tenant, self._corpus.model_path(tenant))

    async def document_indexed(self, event: events_pb2.DocumentIndexed) -> None:
        if not event.tenant or not event.document_id:
            raise InvalidArgument("tenant" if not event.tenant else "document_id", "is required")
        if not self._domain_policy.builds_for(event.tenant):
            return  # no model for this tenant: its documents are not even fetched
        text = await self._document_text(event.tenant, event.document_id)
        if self._corpus.put(event.tenant, event.document_id, text):
            self._rebuilds.request(event.tenant)

    async def document_deleted(self, event: events_pb2.DocumentDeleted) -> None:
        if not event.tenant or not event.document_id:
            raise InvalidArgument("tenant" if not event.tenant else "document_id", "is required")
        # Text stored before the tenant was opted out still goes with its document.
        if self._corpus.remove(event.tenant, event.document_id) and self._domain_policy.builds_for(event.tenant):
            self._rebuilds.request(event.tenant)

    async def rebuilds_settled(self) -> None:
        """Wait for the pending rebuilds (at close, so the models on disk match the text)."""
        await self._rebuilds.settled()

    async def _rebuild(self, tenant: str) -> None:
        lock = self._rebuild_locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            started = time.perf_counter()
            path = await asyncio.to_thread(self._corpus.build, tenant)
            self._engine.set_domain_model(tenant, path)
            logger.info("domain language model of tenant %s rebuilt in %.0f ms", tenant, (time.perf_counter() - started) * 1000)


def _as_pcm(request: speech_pb2.SynthesizeSpeechRequest) -> speech_pb2.SynthesizeSpeechRequest:
    copy = speech_pb2.SynthesizeSpeechRequest()
    copy.CopyFrom(request)
    copy.encoding = speech_pb2.AUDIO_ENCODING_LINEAR_PCM
    return copy
