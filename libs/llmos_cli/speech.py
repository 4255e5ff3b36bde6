"""`llmos transcribe`, `llmos say`, `llmos voice`, and the `asr` / `asr-roundtrip` evaluations."""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmos.clients import DialogueClient, SpeechClient, transcript
from llmos.evaluation import WordErrors, word_errors
from llmos.settings import PlatformSettings, load_settings
from llmos.v1 import dialogue_pb2, speech_pb2
from llmos_cli.client import connect
from llmos_cli.output import add_api_key_option

PUBLISHED_WER = "PocketSphinx general model: ~32% WER on LibriSpeech test-clean (published); 24.5% on the 16 shared clips"
ROUND_TRIP_TARGET = 0.10
TIMEOUT_S = 300.0


def _normalize(text: str) -> list[str]:
    from llmos.spoken import spoken_words  # the same spoken form the domain models use

    return spoken_words(text.replace("-", " "))


def audio_request_bytes(path: Path) -> bytes:
    """A WAV file as is; any other format soundfile reads (FLAC, …) as 16-bit mono WAV."""
    data = path.read_bytes()
    if data[:4] == b"RIFF":
        return data
    import soundfile

    from llmos.audio import encode_wav

    samples, rate = soundfile.read(io.BytesIO(data), dtype="int16", always_2d=True)
    return encode_wav(samples.mean(axis=1).astype(np.int16), rate)


def _speech(args: argparse.Namespace) -> AbstractAsyncContextManager[SpeechClient]:
    return connect(load_settings(PlatformSettings), SpeechClient, args.api_key)


async def _recognize(speech: SpeechClient, audio: bytes, model: str, words: bool = False) -> list[speech_pb2.SpeechRecognitionResult]:
    config = speech_pb2.RecognitionConfig(encoding=speech_pb2.AUDIO_ENCODING_WAV, model=model, enable_word_time_offsets=words)
    return await speech.recognize(config, audio, timeout_s=TIMEOUT_S)


def cmd_transcribe(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _speech(args) as speech:
            results = await _recognize(speech, audio_request_bytes(args.file), args.model, words=args.words)
        for result in results:
            best = result.alternatives[0]
            print(f"{best.transcript}  (confidence {best.confidence:.2f})" if args.words else best.transcript)
            for word in best.words if args.words else ():
                print(f"  {word.start_ms:>7} {word.end_ms:>7}  {word.confidence:.2f}  {word.word}")
        return 0

    return asyncio.run(run())


def cmd_say(args: argparse.Namespace) -> int:
    async def run() -> int:
        request = speech_pb2.SynthesizeSpeechRequest(
            text=args.text, voice_name=args.voice, sample_rate_hz=args.rate, speed=args.speed,
            encoding=speech_pb2.AUDIO_ENCODING_WAV,
        )
        started = time.perf_counter()
        async with _speech(args) as speech:
            response = await speech.synthesize(request, timeout_s=TIMEOUT_S)
        args.output.write_bytes(response.audio)
        elapsed = time.perf_counter() - started
        print(f"{args.output}: {response.duration_ms / 1000:.2f} s at {response.sample_rate_hz} Hz in {elapsed:.2f} s")
        return 0

    return asyncio.run(run())


VOICE_CHUNK_MS = 100  # what a microphone client sends at a time
VOICE_TAIL_MS = 1000  # silence after the recording: the pause that ends a spoken turn


@dataclass
class VoiceTurn:
    """One voice turn as the caller saw it; times in seconds from the end of the recording (the
    end of speech), None when the event never came."""

    transcript: str = ""
    answer: str = ""
    audio: bytearray = field(default_factory=bytearray)
    sample_rate: int = 0
    session_id: str = ""
    citations: list[str] = field(default_factory=list)
    final_transcript_s: float | None = None
    first_answer_text_s: float | None = None
    first_answer_audio_s: float | None = None
    completed_s: float | None = None

    @property
    def audio_s(self) -> float:
        return len(self.audio) / 2 / self.sample_rate if self.sample_rate else 0.0

    def wav(self) -> bytes:
        from llmos.audio import encode_wav

        return encode_wav(np.frombuffer(bytes(self.audio), "<i2"), self.sample_rate)


async def voice_turn(
    dialogue: DialogueClient, wav: bytes, *, voice: str = "", rate: int = 0,
    session_id: str = "", realtime: bool = True, until_first_audio: bool = False,
) -> VoiceTurn:
    """Stream a recording to Converse as a microphone would (100 ms chunks, in real time unless
    `realtime` is off), then a second of silence; collect the turn and time it from the end of speech.
    `until_first_audio`: hang up once the answer starts to be heard (the service cancels the rest)."""
    from llmos.audio import Encoding, decode_clip, samples_to_pcm

    clip = decode_clip(wav, Encoding.WAV, 0, "recording")
    step = clip.sample_rate * VOICE_CHUNK_MS // 1000
    silence = np.zeros(clip.sample_rate * VOICE_TAIL_MS // 1000, np.int16)
    config = dialogue_pb2.ConverseConfig(
        session_id=session_id, voice_name=voice, output_sample_rate_hz=rate,
        recognition=speech_pb2.StreamingRecognitionConfig(
            config=speech_pb2.RecognitionConfig(encoding=speech_pb2.AUDIO_ENCODING_LINEAR_PCM, sample_rate_hertz=clip.sample_rate),
            interim_results=True,
        ),
    )
    turn = VoiceTurn()
    speech_ended = 0.0

    async def microphone() -> AsyncIterator[bytes]:
        nonlocal speech_ended
        audio = np.concatenate([clip.samples, silence])
        last_speech_chunk = (len(clip.samples) - 1) // step
        started = time.perf_counter()
        for index, start in enumerate(range(0, len(audio), step)):
            yield samples_to_pcm(audio[start:start + step])
            if index == last_speech_chunk:
                speech_ended = time.perf_counter()
            if realtime:
                await asyncio.sleep(max(0.0, started + (index + 1) * VOICE_CHUNK_MS / 1000 - time.perf_counter()))

    def since_speech_end() -> float:
        return time.perf_counter() - speech_ended

    # Leaving the loop early closes the stream, which hangs up the call.
    async with aclosing(dialogue.converse(config, microphone(), TIMEOUT_S)) as events:
        async for event in events:
            kind = event.WhichOneof("event")
            turn.session_id = event.session_id or turn.session_id
            if kind == "transcript" and event.transcript.is_final and event.transcript.alternatives:
                turn.transcript = " ".join(filter(None, (turn.transcript, event.transcript.alternatives[0].transcript)))
                turn.final_transcript_s = since_speech_end()
            elif kind == "answer_delta":
                turn.first_answer_text_s = turn.first_answer_text_s or since_speech_end()
                turn.answer += event.answer_delta
            elif kind == "audio":
                turn.first_answer_audio_s = turn.first_answer_audio_s or since_speech_end()
                turn.sample_rate = event.audio.sample_rate_hz
                turn.audio.extend(event.audio.audio)
                if until_first_audio:
                    break
            elif kind == "turn_completed":
                turn.completed_s = since_speech_end()
                turn.citations = [citation.document_id for citation in event.turn_completed.citations]
    return turn


def print_voice_turn(turn: VoiceTurn) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    print(f"you said:  {turn.transcript or '(nothing recognized)'}")
    cited = f"  [{', '.join(turn.citations)}]" if turn.citations else ""
    print(f"assistant: {turn.answer.strip()}{cited}")
    print(
        f"from the end of speech: final transcript {ms(turn.final_transcript_s)}, first answer text "
        f"{ms(turn.first_answer_text_s)}, first answer audio {ms(turn.first_answer_audio_s)}, turn complete {ms(turn.completed_s)}"
    )


def cmd_voice(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with connect(load_settings(PlatformSettings), DialogueClient, args.api_key) as dialogue:
            turn = await voice_turn(
                dialogue, audio_request_bytes(args.file), voice=args.voice, rate=args.rate, session_id=args.session,
                realtime=not args.fast,
            )
        print_voice_turn(turn)
        if turn.sample_rate:
            args.output.write_bytes(turn.wav())
            print(f"answer audio: {turn.audio_s:.2f} s at {turn.sample_rate} Hz -> {args.output}  (session {turn.session_id})")
        return 0

    return asyncio.run(run())


@dataclass(frozen=True)
class Scored:
    name: str
    errors: WordErrors
    audio_s: float
    elapsed_s: float
    hypothesis: str


def _print_scores(title: str, rows: list[Scored], reference: str) -> float:
    def columns(errors: WordErrors) -> str:
        return (f"{errors.reference_words:>5} {errors.wer:>7.1%} {errors.substitutions:>4} {errors.deletions:>4} "
                f"{errors.insertions:>4}")

    print(f"\n{title}")
    print(f"{'file':<58} {'words':>5} {'WER':>7} {'S':>4} {'D':>4} {'I':>4} {'RTF':>5}  hypothesis")
    for row in rows:
        print(f"{row.name[-58:]:<58} {columns(row.errors)} {row.elapsed_s / row.audio_s:>5.2f}  {row.hypothesis[:70]}")
    total = sum((row.errors for row in rows), WordErrors())
    rtf = sum(r.elapsed_s for r in rows) / sum(r.audio_s for r in rows)
    print(f"{'overall':<58} {columns(total)} {rtf:>5.2f}   reference: {reference}")
    print("(WER by jiwer: S substitutions, D deletions, I insertions, in words)")
    return total.wer


def _duration_s(wav: bytes) -> float:
    from llmos.audio import Encoding, decode_clip

    clip = decode_clip(wav, Encoding.WAV, 0)
    return len(clip.samples) / clip.sample_rate


def cmd_eval_asr(args: argparse.Namespace) -> int:
    """WER of Recognize on DIR/transcripts.tsv (path<TAB>reference), per file and overall."""
    rows = [line.split("\t", 1) for line in (args.data / "transcripts.tsv").read_text(encoding="utf-8").splitlines() if "\t" in line]

    async def run() -> int:
        async with _speech(args) as speech:
            for model in args.model:
                scored = []
                for path, reference in rows:
                    audio = audio_request_bytes(args.data / path)
                    started = time.perf_counter()
                    results = await _recognize(speech, audio, model)
                    elapsed = time.perf_counter() - started
                    hypothesis = transcript(results)
                    scored.append(Scored(path, word_errors(_normalize(reference), _normalize(hypothesis)), _duration_s(audio), elapsed, hypothesis))
                _print_scores(f"model {model}: {len(scored)} files from {args.data}", scored, PUBLISHED_WER)
        return 0

    return asyncio.run(run())


def cmd_eval_round_trip(args: argparse.Namespace) -> int:
    """Questions spoken by Synthesize, heard back by Recognize: the WER of the round trip."""
    questions = [q for q in args.questions.read_text(encoding="utf-8").splitlines() if q.strip() and not q.startswith("#")]
    questions = questions[: args.limit]

    async def run() -> int:
        async with _speech(args) as speech:
            spoken = []
            first_audio = []
            for question in questions:
                request = speech_pb2.SynthesizeSpeechRequest(
                    text=question, voice_name=args.voice, sample_rate_hz=16000, encoding=speech_pb2.AUDIO_ENCODING_WAV
                )
                started = time.perf_counter()
                response = await speech.synthesize(request, timeout_s=TIMEOUT_S)
                first_audio.append(time.perf_counter() - started)
                spoken.append(response.audio)
            print(f"synthesized {len(questions)} questions with {args.voice}: median {statistics.median(first_audio):.2f} s each")
            for model in args.model:
                scored = []
                for question, audio in zip(questions, spoken):
                    started = time.perf_counter()
                    hypothesis = transcript(await _recognize(speech, audio, model))
                    scored.append(Scored(question, word_errors(_normalize(question), _normalize(hypothesis)), _duration_s(audio),
                                         time.perf_counter() - started, hypothesis))
                _print_scores(f"round trip, model {model}", scored, f"target <= {ROUND_TRIP_TARGET:.0%} WER with the domain model")
        return 0

    return asyncio.run(run())


DEMO_QUESTIONS = Path("bench/speech/demo_questions.txt")


def register(commands: argparse._SubParsersAction, evals: argparse._SubParsersAction) -> None:
    transcribe = commands.add_parser("transcribe", help="speech to text with the speech service")
    transcribe.add_argument("file", type=Path, help="WAV (16-bit mono, 8-48 kHz), or FLAC and other formats soundfile reads")
    transcribe.add_argument("--model", default="", help="general, domain, or empty: the tenant's domain model when it has one")
    transcribe.add_argument("--words", action="store_true", help="print word times (ms) and confidences")
    transcribe.set_defaults(run=cmd_transcribe)
    add_api_key_option(transcribe)

    say = commands.add_parser("say", help="text to speech with the speech service")
    say.add_argument("text")
    say.add_argument("-o", "--output", type=Path, required=True, help="WAV file to write")
    say.add_argument("--voice", default="", help="a voice from ListVoices (default: the service's)")
    say.add_argument("--rate", type=int, default=0, help="sample rate in Hz (default: the voice's own)")
    say.add_argument("--speed", type=float, default=0.0, help="0.5-2.0 (default 1)")
    say.set_defaults(run=cmd_say)
    add_api_key_option(say)

    voice = commands.add_parser("voice", help="one voice turn from a recording: transcript, answer, answer audio, timings")
    voice.add_argument("file", type=Path, help="the question, spoken (WAV 16-bit mono 8-48 kHz, or FLAC and other formats soundfile reads)")
    voice.add_argument("-o", "--output", type=Path, default=Path("answer.wav"), help="WAV file for the spoken answer")
    voice.add_argument("--voice", default="", help="answer voice from ListVoices (default: the speech service's)")
    voice.add_argument("--rate", type=int, default=0, help="answer sample rate in Hz (default: the voice's own)")
    voice.add_argument("--session", default="", help="continue this session (default: a new one)")
    voice.add_argument("--fast", action="store_true", help="send the recording at once instead of in real time")
    voice.set_defaults(run=cmd_voice)
    add_api_key_option(voice)

    asr = evals.add_parser("asr", help="word error rate of Recognize on recordings with transcripts.tsv")
    asr.add_argument("--data", type=Path, required=True, help="folder with transcripts.tsv (path<TAB>reference) and the audio")
    asr.add_argument("--model", action="append", default=None, help="general and/or domain (repeatable; default general)")
    add_api_key_option(asr)
    asr.set_defaults(run=lambda args: cmd_eval_asr(_models(args)))

    round_trip = evals.add_parser("asr-roundtrip", help="synthesize questions, recognize them back, report WER")
    round_trip.add_argument("--questions", type=Path, default=DEMO_QUESTIONS, help="one question a line")
    round_trip.add_argument("--limit", type=int, default=50)
    round_trip.add_argument("--voice", default="jm_kumo")
    round_trip.add_argument("--model", action="append", default=None, help="general and/or domain (default: both)")
    add_api_key_option(round_trip)
    round_trip.set_defaults(run=lambda args: cmd_eval_round_trip(_models(args, ["general", "domain"])))


def _models(args: argparse.Namespace, default: list[str] | None = None) -> argparse.Namespace:
    args.model = args.model or default or ["general"]
    return args
