"""`llmos transcribe`, `llmos say`, and the `asr` / `asr-roundtrip` evaluations, on the speech service."""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from llmos.cli.client import Metadata, channel, metadata
from llmos.settings import PlatformSettings, load_settings
from llmos.v1 import speech_pb2, speech_pb2_grpc

PUBLISHED_WER = "PocketSphinx general model: ~32% WER on LibriSpeech test-clean (published); 24.5% on the 16 shared clips"
ROUND_TRIP_TARGET = 0.10
TIMEOUT_S = 300.0


def _normalize(text: str) -> list[str]:
    from services.speech.domain import spoken_words  # the same spoken form the domain models use

    return spoken_words(text.replace("-", " "))


def word_errors(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance in words (substitutions, insertions, deletions)."""
    row = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        previous, row[0] = row[:], i
        for j, hyp in enumerate(hypothesis, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ref != hyp))
    return row[-1]


def audio_request_bytes(path: Path) -> bytes:
    """A WAV file as is; any other format soundfile reads (FLAC, …) as 16-bit mono WAV."""
    data = path.read_bytes()
    if data[:4] == b"RIFF":
        return data
    import soundfile

    from llmos.audio import encode_wav

    samples, rate = soundfile.read(io.BytesIO(data), dtype="int16", always_2d=True)
    return encode_wav(samples.mean(axis=1).astype(np.int16), rate)


def _stub(args: argparse.Namespace) -> tuple[grpc.aio.Channel, speech_pb2_grpc.SpeechServiceStub, Metadata]:
    settings = load_settings(PlatformSettings)
    speech_channel = channel(settings, "speech")
    return speech_channel, speech_pb2_grpc.SpeechServiceStub(speech_channel), metadata(settings, args.api_key)


async def _recognize(stub: speech_pb2_grpc.SpeechServiceStub, metadata: tuple[tuple[str, str], ...], audio: bytes,
                     model: str, words: bool = False) -> speech_pb2.RecognizeResponse:
    config = speech_pb2.RecognitionConfig(encoding=speech_pb2.AUDIO_ENCODING_WAV, model=model, enable_word_time_offsets=words)
    return await stub.Recognize(speech_pb2.RecognizeRequest(config=config, audio=audio), metadata=metadata, timeout=TIMEOUT_S)


def _transcript(response: speech_pb2.RecognizeResponse) -> str:
    return " ".join(r.alternatives[0].transcript for r in response.results if r.alternatives)


def _fail(exc: grpc.aio.AioRpcError) -> int:
    print(f"speech service: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def cmd_transcribe(args: argparse.Namespace) -> int:
    async def run() -> int:
        channel, stub, metadata = _stub(args)
        async with channel:
            try:
                response = await _recognize(stub, metadata, audio_request_bytes(args.file), args.model, words=args.words)
            except grpc.aio.AioRpcError as exc:
                return _fail(exc)
        for result in response.results:
            best = result.alternatives[0]
            print(f"{best.transcript}  (confidence {best.confidence:.2f})" if args.words else best.transcript)
            for word in best.words if args.words else ():
                print(f"  {word.start_ms:>7} {word.end_ms:>7}  {word.confidence:.2f}  {word.word}")
        return 0

    return asyncio.run(run())


def cmd_say(args: argparse.Namespace) -> int:
    async def run() -> int:
        channel, stub, metadata = _stub(args)
        request = speech_pb2.SynthesizeSpeechRequest(
            text=args.text, voice_name=args.voice, sample_rate_hz=args.rate, speed=args.speed,
            encoding=speech_pb2.AUDIO_ENCODING_WAV,
        )
        started = time.perf_counter()
        async with channel:
            try:
                response = await stub.Synthesize(request, metadata=metadata, timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                return _fail(exc)
        args.output.write_bytes(response.audio)
        elapsed = time.perf_counter() - started
        print(f"{args.output}: {response.duration_ms / 1000:.2f} s at {response.sample_rate_hz} Hz in {elapsed:.2f} s")
        return 0

    return asyncio.run(run())


@dataclass(frozen=True)
class Scored:
    name: str
    errors: int
    words: int
    audio_s: float
    elapsed_s: float
    hypothesis: str

    @property
    def wer(self) -> float:
        return self.errors / max(1, self.words)


def _print_scores(title: str, rows: list[Scored], reference: str) -> float:
    print(f"\n{title}")
    print(f"{'file':<58} {'words':>5} {'WER':>7} {'RTF':>5}  hypothesis")
    for row in rows:
        print(f"{row.name[-58:]:<58} {row.words:>5} {row.wer:>7.1%} {row.elapsed_s / row.audio_s:>5.2f}  {row.hypothesis[:70]}")
    errors, words = sum(r.errors for r in rows), sum(r.words for r in rows)
    rtf = sum(r.elapsed_s for r in rows) / sum(r.audio_s for r in rows)
    print(f"{'overall':<58} {words:>5} {errors / words:>7.1%} {rtf:>5.2f}   reference: {reference}")
    return errors / words


def _duration_s(wav: bytes) -> float:
    from llmos.audio import Encoding, decode_clip

    clip = decode_clip(wav, Encoding.WAV, 0)
    return len(clip.samples) / clip.sample_rate


def cmd_eval_asr(args: argparse.Namespace) -> int:
    """WER of Recognize on DIR/transcripts.tsv (path<TAB>reference), per file and overall."""
    rows = [line.split("\t", 1) for line in (args.data / "transcripts.tsv").read_text(encoding="utf-8").splitlines() if "\t" in line]

    async def run() -> int:
        channel, stub, metadata = _stub(args)
        async with channel:
            for model in args.model:
                scored = []
                for path, reference in rows:
                    audio = audio_request_bytes(args.data / path)
                    started = time.perf_counter()
                    try:
                        response = await _recognize(stub, metadata, audio, model)
                    except grpc.aio.AioRpcError as exc:
                        return _fail(exc)
                    elapsed = time.perf_counter() - started
                    hypothesis = _transcript(response)
                    ref = _normalize(reference)
                    scored.append(Scored(path, word_errors(ref, _normalize(hypothesis)), len(ref), _duration_s(audio), elapsed, hypothesis))
                _print_scores(f"model {model}: {len(scored)} files from {args.data}", scored, PUBLISHED_WER)
        return 0

    return asyncio.run(run())


def cmd_eval_round_trip(args: argparse.Namespace) -> int:
    """Questions spoken by Synthesize, heard back by Recognize: the WER of the round trip."""
    questions = [q for q in args.questions.read_text(encoding="utf-8").splitlines() if q.strip() and not q.startswith("#")]
    questions = questions[: args.limit]

    async def run() -> int:
        channel, stub, metadata = _stub(args)
        async with channel:
            spoken = []
            first_audio = []
            for question in questions:
                request = speech_pb2.SynthesizeSpeechRequest(
                    text=question, voice_name=args.voice, sample_rate_hz=16000, encoding=speech_pb2.AUDIO_ENCODING_WAV
                )
                started = time.perf_counter()
                try:
                    response = await stub.Synthesize(request, metadata=metadata, timeout=TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    return _fail(exc)
                first_audio.append(time.perf_counter() - started)
                spoken.append(response.audio)
            print(f"synthesized {len(questions)} questions with {args.voice}: median {statistics.median(first_audio):.2f} s each")
            for model in args.model:
                scored = []
                for question, audio in zip(questions, spoken):
                    started = time.perf_counter()
                    try:
                        response = await _recognize(stub, metadata, audio, model)
                    except grpc.aio.AioRpcError as exc:
                        return _fail(exc)
                    hypothesis = _transcript(response)
                    ref = _normalize(question)
                    scored.append(Scored(question, word_errors(ref, _normalize(hypothesis)), len(ref), _duration_s(audio),
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
    _key_option(transcribe)

    say = commands.add_parser("say", help="text to speech with the speech service")
    say.add_argument("text")
    say.add_argument("-o", "--output", type=Path, required=True, help="WAV file to write")
    say.add_argument("--voice", default="", help="a voice from ListVoices (default: the service's)")
    say.add_argument("--rate", type=int, default=0, help="sample rate in Hz (default: the voice's own)")
    say.add_argument("--speed", type=float, default=0.0, help="0.5-2.0 (default 1)")
    say.set_defaults(run=cmd_say)
    _key_option(say)

    asr = evals.add_parser("asr", help="word error rate of Recognize on recordings with transcripts.tsv")
    asr.add_argument("--data", type=Path, required=True, help="folder with transcripts.tsv (path<TAB>reference) and the audio")
    asr.add_argument("--model", action="append", default=None, help="general and/or domain (repeatable; default general)")
    _key_option(asr)
    asr.set_defaults(run=lambda args: cmd_eval_asr(_models(args)))

    round_trip = evals.add_parser("asr-roundtrip", help="synthesize questions, recognize them back, report WER")
    round_trip.add_argument("--questions", type=Path, default=DEMO_QUESTIONS, help="one question a line")
    round_trip.add_argument("--limit", type=int, default=50)
    round_trip.add_argument("--voice", default="jm_kumo")
    round_trip.add_argument("--model", action="append", default=None, help="general and/or domain (default: both)")
    _key_option(round_trip)
    round_trip.set_defaults(run=lambda args: cmd_eval_round_trip(_models(args, ["general", "domain"])))


def _key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", default="", help="API key (default: LLMOS_API_KEY, else the first admin key configured)")


def _models(args: argparse.Namespace, default: list[str] | None = None) -> argparse.Namespace:
    args.model = args.model or default or ["general"]
    return args
