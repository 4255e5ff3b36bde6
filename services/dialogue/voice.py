"""Voice turns (Converse): audio in, transcripts, answers and the answer's audio out, with barge-in.

The caller's audio goes to the speech service's StreamingRecognize; its interim and final
transcripts are passed on. Each final transcript is one turn of the same turn logic as Chat
(`DialogueCore.chat`): its answer deltas are passed on and cut into speakable pieces (the first
clause, then sentences; llmos.utterances; a long first clause cut again before a phrase), each
synthesized as soon as it is complete, so the answer is heard while it is still being generated.
Each turn is a `dialogue.voice_turn` span whose events time its stages up to the first audio.

Barge-in: the audio is also watched here by the same voice-activity endpointer the recognizer
uses (llmos.audio), so user speech is noticed the moment its start window fills, without waiting
for a transcript. Speech while an answer is being generated or synthesized, or while its audio
is still playing on the caller's side (estimated from the durations sent), cancels generation and
synthesis, and the caller is told (`barge_in`) to stop playback. The words spoken become the next
turn when their final transcript arrives. A turn cancelled before its answer was complete is not
saved in the session; the caller heard only part of it. Callers that play audio aloud must
cancel their own echo, or the assistant interrupts itself.

Backpressure: at most EVENT_QUEUE_SIZE responses wait for the caller to read them. When they are
not read, transcripts, answers and audio wait where they are made, the recognizer is no longer
fed, and at most AUDIO_QUEUE_CHUNKS chunks of the caller's audio are read ahead: a caller that
speaks but never reads is no longer read, instead of growing the server's memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import trace

from llmos.audio import Encoding, Endpointer, EndpointConfig, PcmStream, Resampler, SpeechStart
from llmos.auth import Principal
from llmos.deadline import Deadline, timeout_within
from llmos.errors import InvalidArgument
from llmos.utterances import UtteranceChunker
from llmos.v1 import dialogue_pb2, speech_pb2

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("llmos.dialogue.voice")

# Span of one voice turn, from its final transcript; its events mark the stages up to the first
# answer audio (the turn logic adds intent, retrieval, evidence and generation).
VOICE_TURN_SPAN = "dialogue.voice_turn"
FIRST_DELTA, FIRST_PIECE, FIRST_AUDIO = "first_answer_text", "first_piece_complete", "first_answer_audio"

# The first piece is what the caller waits for, and synthesis takes about as long as the piece is
# long: a first piece longer than FIRST_PIECE_WORDS is cut before the first word that opens a
# phrase, once it has MIN_FIRST_PIECE_WORDS and before MAX_FIRST_PIECE_WORDS, and spoken with a
# clause's open intonation (a comma); the rest follows as the next piece. Any shorter first piece
# is heard sooner: a clause of 11 words with its numbers read out ("4 to 8 working days and costs
# 14 EUR") took 2.3 s to synthesize against 0.6-0.9 s for the usual 3-6 words.
FIRST_PIECE_WORDS = 6
MIN_FIRST_PIECE_WORDS, MAX_FIRST_PIECE_WORDS = 3, 12
PHRASE_OPENERS = frozenset({
    "and", "but", "or", "so", "because", "if", "unless", "when", "while", "where", "which", "who", "until",
    "after", "before", "since", "in", "on", "at", "to", "for", "with", "within", "without", "from", "by", "during", "via",
})
# "to" after a number joins a range ("4 to 8", "four to eight days"): not a phrase of its own.
NUMBER_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve fifteen twenty thirty forty fifty hundred".split()
)
MAX_VOICE_NAME_CHARS = 64
AUDIO_QUEUE_CHUNKS = 64  # chunks waiting for the recognizer before the caller is slowed down
EVENT_QUEUE_SIZE = 64  # responses waiting for the caller to read them before the conversation waits


class TurnLogic(Protocol):
    """One text turn, streamed: DialogueCore.chat."""

    def chat(
        self, principal: Principal, tenant: str, request: dialogue_pb2.ChatRequest, deadline: Deadline | None
    ) -> AsyncIterator[dialogue_pb2.ChatResponse]: ...


class Recognizer(Protocol):
    """The speech service's streaming recognition (llmos.clients.SpeechClient)."""

    def recognize_stream(
        self, config: speech_pb2.StreamingRecognitionConfig, audio: AsyncIterator[bytes], timeout_s: float | None
    ) -> AsyncIterator[speech_pb2.SpeechRecognitionResult]: ...


class Synthesizer(Protocol):
    """The speech service's streaming synthesis (llmos.clients.SpeechClient)."""

    def synthesize_stream(self, request: speech_pb2.SynthesizeSpeechRequest, timeout_s: float) -> AsyncIterator[speech_pb2.SynthesizeSpeechResponse]: ...


@dataclass(frozen=True)
class VoiceLimits:
    vad_mode: int
    speech_start: EndpointConfig  # barge-in detection; the caller's endpointing start fields override it
    call_timeout_s: float


class VoiceTurns:
    def __init__(self, turns: TurnLogic, recognizer: Recognizer, synthesizer: Synthesizer, limits: VoiceLimits) -> None:
        self.turns = turns
        self.recognizer = recognizer
        self.synthesizer = synthesizer
        self.limits = limits

    async def converse(
        self, principal: Principal, tenant: str, config: dialogue_pb2.ConverseConfig, audio: AsyncIterator[bytes],
        deadline: Deadline | None,
    ) -> AsyncIterator[dialogue_pb2.ConverseResponse]:
        recognition = self._recognition_config(config, tenant)
        conversation = _Conversation(self, principal, tenant, config, recognition, self._speech_detector(recognition), deadline)
        async with conversation.running(audio):
            async for response in conversation.responses():
                yield response

    def _recognition_config(self, config: dialogue_pb2.ConverseConfig, tenant: str) -> speech_pb2.StreamingRecognitionConfig:
        if len(config.voice_name) > MAX_VOICE_NAME_CHARS:
            raise InvalidArgument("voice_name", f"longer than {MAX_VOICE_NAME_CHARS} characters")
        recognition = speech_pb2.StreamingRecognitionConfig()
        if config.HasField("recognition"):
            recognition.CopyFrom(config.recognition)
        else:
            recognition.interim_results = True
        if recognition.config.encoding == speech_pb2.AUDIO_ENCODING_LINEAR_PCM and not recognition.config.sample_rate_hertz:
            raise InvalidArgument("recognition.config.sample_rate_hertz", "is required for LINEAR_PCM audio (8000-48000)")
        recognition.config.tenant = tenant
        return recognition

    def _speech_detector(self, recognition: speech_pb2.StreamingRecognitionConfig) -> SpeechDetector:
        asked = recognition.endpointing
        endpointing = self.limits.speech_start.overridden(asked.start_history_ms, asked.start_threshold)
        wav = recognition.config.encoding == speech_pb2.AUDIO_ENCODING_WAV
        return SpeechDetector(endpointing, self.limits.vad_mode, wav, recognition.config.sample_rate_hertz)


class SpeechDetector:
    """Voice activity on the caller's audio: yields once per utterance, when its start window fills.

    Encoding UNSPECIFIED follows the speech service: WAV when the audio starts with RIFF.
    """

    def __init__(self, endpointing: EndpointConfig, vad_mode: int, wav: bool, sample_rate: int) -> None:
        self._endpointing = endpointing
        self._vad_mode = vad_mode
        self._wav = wav
        self._sample_rate = sample_rate
        self._pcm: PcmStream | None = None
        self._resampler: Resampler | None = None
        self._endpointer: Endpointer | None = None

    def feed(self, chunk: bytes) -> Iterator[SpeechStart]:
        if self._pcm is None:
            wav = self._wav or chunk[:4] == b"RIFF"
            self._pcm = PcmStream(Encoding.WAV if wav else Encoding.LINEAR16, self._sample_rate)
        samples = self._pcm.feed(chunk)
        if not self._pcm.sample_rate:
            return  # the WAV header is still arriving
        if self._endpointer is None:
            self._resampler = Resampler(self._pcm.sample_rate, Endpointer.SAMPLE_RATE)
            self._endpointer = Endpointer(self._endpointing, self._vad_mode)
        assert self._resampler is not None
        for event in self._endpointer.process(self._resampler.process(samples)):
            if isinstance(event, SpeechStart):
                yield event


def first_pieces(piece: str) -> list[str]:
    """The answer's first piece, cut before a phrase when it is long (FIRST_PIECE_WORDS)."""
    words = piece.split()
    if len(words) <= FIRST_PIECE_WORDS:
        return [piece]
    for index in range(MIN_FIRST_PIECE_WORDS, min(MAX_FIRST_PIECE_WORDS, len(words) - 2) + 1):
        before, opener = words[index - 1], words[index].lower()
        # A word already ending in punctuation is a boundary the chunker saw.
        number = any(c.isdigit() for c in before) or before.lower() in NUMBER_WORDS
        if opener in PHRASE_OPENERS and before[-1].isalpha() and not (opener == "to" and number):
            return [" ".join(words[:index]) + ",", " ".join(words[index:])]
    return [piece]


class _Conversation:
    """One Converse stream: the audio pump, the transcript reader, and the turn in progress."""

    def __init__(
        self, voice: VoiceTurns, principal: Principal, tenant: str, config: dialogue_pb2.ConverseConfig,
        recognition: speech_pb2.StreamingRecognitionConfig, detector: SpeechDetector, deadline: Deadline | None,
    ) -> None:
        self._voice = voice
        self._principal = principal
        self._tenant = tenant
        self._config = config
        self._recognition = recognition
        self._deadline = deadline
        self._session_id = config.session_id  # the saved session the next turn continues
        self._turn_session_id = ""  # the session of the turn in progress (new and unsaved on a first turn)
        self._detector = detector
        self._to_recognizer: asyncio.Queue[bytes | None] = asyncio.Queue(AUDIO_QUEUE_CHUNKS)
        self._events: asyncio.Queue[dialogue_pb2.ConverseResponse] = asyncio.Queue(EVENT_QUEUE_SIZE)
        # Set once, when the conversation ends: None when it is over, or the error that ended it.
        self._ended: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self._turn: asyncio.Task[None] | None = None
        self._playing_until = 0.0  # loop time when the audio sent so far has played out

    # -- lifecycle --------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self, audio: AsyncIterator[bytes]) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(self._guard(self._pump(audio))), asyncio.create_task(self._guard(self._listen()))]
        try:
            yield
        finally:
            for task in [*tasks, self._turn]:
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in [*tasks, self._turn] if t is not None), return_exceptions=True)

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work`; its error ends the conversation (the RPC maps it to a status)."""
        try:
            await work
        except Exception as exc:  # noqa: BLE001 - handed to the RPC, not swallowed
            self._end(exc)

    def _end(self, error: BaseException | None) -> None:
        if not self._ended.done():
            self._ended.set_result(error)

    async def responses(self) -> AsyncIterator[dialogue_pb2.ConverseResponse]:
        """The responses in order until the conversation ends; then its error, if it failed."""
        while True:
            if not self._events.empty():
                yield self._events.get_nowait()
                continue
            if self._ended.done():
                if (error := self._ended.result()) is not None:
                    raise error
                return
            next_event = asyncio.ensure_future(self._events.get())
            try:
                await asyncio.wait([next_event, self._ended], return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not next_event.done():
                    next_event.cancel()  # a get not done has taken nothing from the queue
            if next_event.done() and not next_event.cancelled():
                yield next_event.result()

    async def _emit(self, **event: object) -> None:
        """Queue a response, waiting while EVENT_QUEUE_SIZE wait for the caller (backpressure)."""
        session_id = self._turn_session_id or self._session_id
        await self._events.put(dialogue_pb2.ConverseResponse(session_id=session_id, **event))  # type: ignore[arg-type]

    # -- audio in ---------------------------------------------------------------------------

    async def _pump(self, audio: AsyncIterator[bytes]) -> None:
        """Caller's audio to the recognizer, watching it for speech over an answer."""
        async for chunk in audio:
            for _ in self._detector.feed(chunk):
                if self._answering():
                    await self._barge_in()
            await self._to_recognizer.put(chunk)
        await self._to_recognizer.put(None)

    async def _audio_for_recognizer(self) -> AsyncIterator[bytes]:
        while (chunk := await self._to_recognizer.get()) is not None:
            yield chunk

    async def _listen(self) -> None:
        """Transcripts out; each final one with words starts a turn."""
        timeout_s = None if self._deadline is None else timeout_within(self._deadline, 0.0)
        async for result in self._voice.recognizer.recognize_stream(self._recognition, self._audio_for_recognizer(), timeout_s):
            await self._emit(transcript=result)
            text = result.alternatives[0].transcript.strip() if result.alternatives else ""
            if result.is_final and text:
                if self._answering():
                    await self._barge_in()
                self._turn = asyncio.create_task(self._guard(self._answer(text)))
        if self._turn is not None:
            await asyncio.wait([self._turn])
        self._end(None)

    # -- barge-in ---------------------------------------------------------------------------

    def _answering(self) -> bool:
        in_progress = self._turn is not None and not self._turn.done()
        return in_progress or asyncio.get_running_loop().time() < self._playing_until

    async def _barge_in(self) -> None:
        started = time.perf_counter()
        turn, self._turn = self._turn, None
        self._playing_until = 0.0
        self._turn_session_id = ""
        if turn is not None and not turn.done():
            turn.cancel()
            await asyncio.wait([turn])
        await self._emit(barge_in=True)
        logger.info("barge-in: answer cancelled in %.1f ms", (time.perf_counter() - started) * 1000)

    # -- one turn ---------------------------------------------------------------------------

    async def _answer(self, text: str) -> None:
        # The span is current in both tasks below, so the turn logic's stages and calls fall under it.
        with tracer.start_as_current_span(VOICE_TURN_SPAN):
            await self._answer_in_span(text)

    async def _answer_in_span(self, text: str) -> None:
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        generator = asyncio.create_task(self._generate(text, pieces))
        speaker = asyncio.create_task(self._speak(pieces))
        try:
            # Either side failing (say, a voice the speech service does not know) ends the turn now.
            await asyncio.wait([generator, speaker], return_when=asyncio.FIRST_EXCEPTION)
            for task in (generator, speaker):
                if task.done() and (error := task.exception()) is not None:
                    raise error
            final = generator.result()
        finally:
            for task in (generator, speaker):
                task.cancel()
            await asyncio.wait([generator, speaker])
        await self._emit(turn_completed=final)

    async def _generate(self, text: str, pieces: asyncio.Queue[str | None]) -> dialogue_pb2.ChatResponse:
        request = dialogue_pb2.ChatRequest(
            session_id=self._session_id, message=text, user_id=self._config.user_id, tenant=self._tenant, spoken=True
        )
        chunker = UtteranceChunker()
        intent = dialogue_pb2.Intent()
        final = dialogue_pb2.ChatResponse()
        span = trace.get_current_span()
        first_delta = first_piece = True
        try:
            async for response in self._voice.turns.chat(self._principal, self._tenant, request, self._deadline):
                self._turn_session_id = response.session_id
                if response.HasField("intent"):
                    intent.CopyFrom(response.intent)
                if response.delta:
                    if first_delta:
                        span.add_event(FIRST_DELTA)
                        first_delta = False
                    await self._emit(answer_delta=response.delta)
                    for piece in chunker.feed(response.delta):
                        first_piece = self._queue_piece(piece, first_piece, pieces)
                if response.final:
                    final.CopyFrom(response)
                    self._session_id = response.session_id  # saved before the final message
            for piece in chunker.flush():
                first_piece = self._queue_piece(piece, first_piece, pieces)
        finally:
            pieces.put_nowait(None)
        final.intent.CopyFrom(intent)  # the whole turn in one message: intent, citations, latency
        return final

    @staticmethod
    def _queue_piece(piece: str, first: bool, pieces: asyncio.Queue[str | None]) -> bool:
        """Queue a speakable piece for synthesis (the first one cut short); False once one is queued."""
        parts = first_pieces(piece) if first else [piece]
        if first:
            trace.get_current_span().add_event(FIRST_PIECE, {"characters": len(parts[0])})
        for part in parts:
            pieces.put_nowait(part)
        return False

    async def _speak(self, pieces: asyncio.Queue[str | None]) -> None:
        loop = asyncio.get_running_loop()
        span = trace.get_current_span()
        first_audio = True
        while (piece := await pieces.get()) is not None:
            request = speech_pb2.SynthesizeSpeechRequest(
                text=piece, voice_name=self._config.voice_name, sample_rate_hz=self._config.output_sample_rate_hz,
                encoding=speech_pb2.AUDIO_ENCODING_LINEAR_PCM, tenant=self._tenant,
            )
            timeout_s = timeout_within(self._deadline, self._voice.limits.call_timeout_s)
            requested = time.perf_counter()
            async for audio in self._voice.synthesizer.synthesize_stream(request, timeout_s):
                if first_audio:
                    synthesis_ms = (time.perf_counter() - requested) * 1000
                    span.add_event(FIRST_AUDIO, {"synthesis_ms": synthesis_ms, "characters": len(piece)})
                    first_audio = False
                self._playing_until = max(self._playing_until, loop.time()) + audio.duration_ms / 1000
                await self._emit(audio=audio)
