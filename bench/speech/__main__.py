"""`python -m bench.speech`: ASR real-time factor, TTS real-time factor and time to first audio,
and voice-turn latency from the end of speech to the first answer audio.

ASR and TTS run the service's own engines in-process (no network): PocketSphinx through the
endpointed recognizer on the shared recordings, beside a plain whole-clip PocketSphinx decode as
the reference measured in the same run; Kokoro and espeak-ng through the voices SynthesizeStream
uses, timing a short sentence, the first piece of a streamed answer (what a caller hears first)
and a whole text. Voice turns go through a private embedded stack (free ports, temporary home):
`demo/kb` is indexed, questions are spoken once by the speech service (Kokoro) and each is
streamed to DialogueService.Converse in real time, as `llmos voice` does; the answer is spoken
by the default voice, and the caller hangs up once it is heard. Targets on this machine: ASR RTF <= 0.3, Kokoro first audio <= 1 s for a
short sentence; voice agents (Pipecat, LiveKit) aim at 500-800 ms voice-to-voice on GPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pocketsphinx import Decoder

from bench.common import NOISY_LOAD, private_environment
from llmos.audio import Encoding, EndpointConfig, decode_clip, encode_wav, pcm_to_samples, resample, samples_to_pcm
from llmos.clients import DialogueClient, SpeechClient
from llmos.grpcutil.client import bearer
from llmos.models import artefact_dir
from llmos.settings import PlatformSettings, load_settings
from llmos.stack import Stack
from llmos.telemetry import SPAN_FILE, read_spans
from llmos.utterances import split_for_speech
from llmos.v1 import speech_pb2
from llmos_cli.client import channel
from llmos_cli.speech import DEMO_QUESTIONS, VoiceTurn, audio_request_bytes, voice_turn
from services.dialogue.voice import FIRST_AUDIO, FIRST_DELTA, FIRST_PIECE, VOICE_TURN_SPAN
from services.speech.asr import AsrEngine, recognize_clip
from services.speech.tts import EspeakVoice, KokoroModel, KokoroVoice

RESULTS = Path("bench/results/speech.json")
SHORT = "Your order has shipped."
# A typical grounded answer: what matters is how soon its first piece is heard.
ANSWER = "Gift cards are valid for three years, and you can use them in our shops and online."
LONG = (
    "Your order has shipped and should arrive within three working days. "
    "You can follow the parcel with the tracking link we sent by e-mail. "
    "If it does not arrive, contact us and we will send a replacement."
)


def asr(data: Path, limit: int) -> dict[str, float]:
    rows = [line.split("\t", 1)[0] for line in (data / "transcripts.tsv").read_text().splitlines() if "\t" in line][:limit]
    clips = []
    for path in rows:
        clip = decode_clip(audio_request_bytes(data / path), Encoding.WAV, 0)
        clips.append((clip.samples, clip.sample_rate))
    audio_s = sum(len(s) / r for s, r in clips)
    engine = AsrEngine(1, 10.0, 0.5)
    started = time.perf_counter()
    for samples, rate in clips:
        recognize_clip(engine, samples, rate, EndpointConfig())
    service_s = time.perf_counter() - started
    decoder = Decoder(loglevel="FATAL")
    started = time.perf_counter()
    for samples, rate in clips:
        decoder.start_utt()
        decoder.process_raw(samples_to_pcm(resample(samples, rate, 16000)), full_utt=True)
        decoder.end_utt()
    plain_s = time.perf_counter() - started
    return {"clips": len(clips), "audio_s": audio_s, "service_rtf": service_s / audio_s, "plain_pocketsphinx_rtf": plain_s / audio_s}


def tts(voice: KokoroVoice | EspeakVoice, repeats: int) -> dict[str, float]:
    voice.speak("Hello.", 1.0)  # warm-up: the service does the same at start
    first, first_piece, rtf = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        audio = voice.speak(SHORT, 1.0)
        first.append(time.perf_counter() - started)
        started = time.perf_counter()
        voice.speak(split_for_speech(ANSWER)[0], 1.0)
        first_piece.append(time.perf_counter() - started)
    for _ in range(max(1, repeats // 2)):
        started = time.perf_counter()
        total = sum(len(voice.speak(piece, 1.0)) for piece in split_for_speech(LONG))
        rtf.append((time.perf_counter() - started) / (total / voice.info.sample_rate))
    return {
        "first_audio_p50_s": statistics.median(first),
        "first_audio_max_s": max(first),
        "answer_first_piece_p50_s": statistics.median(first_piece),
        "short_sentence_audio_s": len(audio) / voice.info.sample_rate,
        "rtf": statistics.median(rtf),
    }


BENCH_KEY = "bench-admin-key"  # the private stack's key: tenant "bench", administrator


async def spoken_questions(settings: PlatformSettings, questions: list[str]) -> list[bytes]:
    """Each question said once by the speech service (Kokoro), 16 kHz WAV, a short pause before it."""
    metadata = (("authorization", bearer(BENCH_KEY)),)
    async with channel(settings, "speech") as speech_channel:
        speech = SpeechClient(speech_channel, metadata)
        recordings = []
        for question in questions:
            response = await speech.synthesize(
                speech_pb2.SynthesizeSpeechRequest(text=question, voice_name="jm_kumo", sample_rate_hz=16000), timeout_s=300
            )
            samples = np.concatenate([np.zeros(4800, np.int16), pcm_to_samples(response.audio)])
            recordings.append(encode_wav(samples, 16000))
    return recordings


async def run_voice_turns(settings: PlatformSettings, recordings: list[bytes]) -> list[tuple[VoiceTurn, float, float]]:
    """Each turn with the wall-clock window (ns) of its call, to find its span in the stack's span file."""
    metadata = (("authorization", bearer(BENCH_KEY)),)
    turns = []
    async with channel(settings, "dialogue") as dialogue_channel:
        dialogue = DialogueClient(dialogue_channel, metadata)
        for recording in recordings:
            # Hanging up at the first answer audio cancels the rest of the turn, so one turn's long
            # answer does not slow the next one down.
            called = time.time_ns()
            turn = await voice_turn(dialogue, recording, until_first_audio=True)
            turns.append((turn, called, time.time_ns()))
    return turns


# A voice turn's marks in the order they happen, in seconds from the end of speech: the caller's
# (final transcript, first answer audio) and the dialogue service's span events (VOICE_TURN_SPAN).
# A stage is the time from the mark before it.
VOICE_MARKS = (
    "final_transcript", "intent", "retrieval", "evidence", "generation", "first_answer_text",
    "first_piece_complete", "first_piece_synthesized", "first_answer_audio",
)
SPAN_EVENTS = {"intent": "intent", "retrieval": "retrieval", "evidence": "evidence", "generation": "generation",
               FIRST_DELTA: "first_answer_text", FIRST_PIECE: "first_piece_complete", FIRST_AUDIO: "first_piece_synthesized"}


def turn_marks(turn: VoiceTurn, window: tuple[float, float], spans: list[dict[str, Any]]) -> dict[str, float]:
    """The marks of one turn: the caller's, and those of the last voice-turn span started in its call,
    placed after the final transcript as the service saw them (its span starts on that transcript)."""
    marks = {"final_transcript": turn.final_transcript_s, "first_answer_audio": turn.first_answer_audio_s}
    inside = [span for span in spans if window[0] <= span["start_ns"] <= window[1]]
    if inside and turn.final_transcript_s is not None:
        span = max(inside, key=lambda record: record["start_ns"])
        for event in span["events"]:
            if event["name"] in SPAN_EVENTS:
                marks[SPAN_EVENTS[event["name"]]] = turn.final_transcript_s + (event["time_ns"] - span["start_ns"]) / 1e9
        for event in span["events"]:
            if event["name"] == FIRST_AUDIO:
                marks["first_piece_synthesis_s"] = event["attributes"]["synthesis_ms"] / 1000
            elif event["name"] == FIRST_PIECE:
                marks["first_piece_characters"] = event["attributes"]["characters"]
    return {name: value for name, value in marks.items() if value is not None}


def turn_stages(marks: dict[str, float]) -> dict[str, float]:
    """Seconds each stage took: from the previous mark the turn has to this one."""
    stages, previous = {}, 0.0
    for name in VOICE_MARKS:
        if name in marks:
            stages[name] = marks[name] - previous
            previous = marks[name]
    return stages


def voice_turns(count: int) -> dict[str, object]:
    from bench.chat.__main__ import index_kb

    lines = [q for q in DEMO_QUESTIONS.read_text(encoding="utf-8").splitlines() if q.strip() and not q.startswith("#")]
    questions = lines[:count]
    with tempfile.TemporaryDirectory(prefix="llmos-bench-speech-") as folder:
        # Latency is measured, not limited: a slow machine must not turn into failed turns.
        private_environment(Path(folder), BENCH_KEY, LLMOS_DIALOGUE_CALL_TIMEOUT_S="600")
        settings = load_settings(PlatformSettings)
        stack = Stack(settings)
        print(f"starting a private stack in {folder} …")
        print(f"SERVING after {stack.start():.1f} s")
        try:
            asyncio.run(index_kb(settings, (("authorization", bearer(BENCH_KEY)),)))
            recordings = asyncio.run(spoken_questions(settings, questions))
            load_before = os.getloadavg()[0]
            timed = asyncio.run(run_voice_turns(settings, recordings))
            load_after = os.getloadavg()[0]
        finally:
            stack.stop()  # the services flush their spans as they stop
        spans = [record for record in read_spans(Path(folder) / "telemetry" / SPAN_FILE) if record["name"] == VOICE_TURN_SPAN]
    turns = [turn for turn, _, _ in timed]
    marks = [turn_marks(turn, (called, returned), spans) for turn, called, returned in timed]
    stages = [turn_stages(turn) for turn in marks]

    def percentiles(values: list[float | None]) -> dict[str, float]:
        seen = [value for value in values if value is not None]
        if not seen:
            return {"p50": float("nan"), "p95": float("nan"), "count": 0}
        return {"p50": float(np.percentile(seen, 50)), "p95": float(np.percentile(seen, 95)), "count": len(seen)}

    return {
        "turns": len(turns),
        "load_average_1m": [load_before, load_after],
        "noisy": max(load_before, load_after) > NOISY_LOAD,
        "final_transcript_s": percentiles([t.final_transcript_s for t in turns]),
        "first_answer_text_s": percentiles([t.first_answer_text_s for t in turns]),
        "first_answer_audio_s": percentiles([t.first_answer_audio_s for t in turns]),
        # Per stage, seconds from the end of speech to its mark, and the stage's own time.
        "marks_s": {name: percentiles([m.get(name) for m in marks]) for name in VOICE_MARKS},
        "stages_s": {name: percentiles([s.get(name) for s in stages]) for name in VOICE_MARKS},
        "first_piece_synthesis_s": percentiles([m.get("first_piece_synthesis_s") for m in marks]),
        "first_piece_characters": percentiles([m.get("first_piece_characters") for m in marks]),
        "detail": [
            {"question": q, "heard": t.transcript, "answer_start": t.answer, "first_answer_audio_s": t.first_answer_audio_s,
             "marks_s": m}
            for q, t, m in zip(questions, turns, marks, strict=True)
        ],
    }


def print_voice_turns(voice: dict[str, Any]) -> None:
    noisy = " (noisy: load above 1)" if voice["noisy"] else ""
    print(f"\nvoice turns through Converse, {voice['turns']} spoken questions, seconds from the end of speech; "
          f"load {voice['load_average_1m'][0]:.1f}-{voice['load_average_1m'][1]:.1f}{noisy}")
    print(f"{'mark':<26} {'p50':>7} {'p95':>7} {'stage p50':>10} {'stage p95':>10}")
    for name in VOICE_MARKS:
        mark, stage = voice["marks_s"][name], voice["stages_s"][name]
        if mark["count"]:
            print(f"{name.replace('_', ' '):<26} {mark['p50']:>7.2f} {mark['p95']:>7.2f} {stage['p50']:>10.2f} {stage['p95']:>10.2f}")
    synthesis = voice["first_piece_synthesis_s"]
    if synthesis["count"]:
        print(f"{'(synthesis call, 1st piece)':<26} {'':>7} {'':>7} {synthesis['p50']:>10.2f} {synthesis['p95']:>10.2f}"
              f"   first piece {voice['first_piece_characters']['p50']:.0f} characters (p50)")
    print("reference: Pipecat / LiveKit voice agents aim at 0.5-0.8 s voice-to-voice on GPUs; target p50 <= 1.5 s, p95 <= 2.0 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/speech"))
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--home", type=Path, default=Path(".llmos"))
    parser.add_argument("--tts-threads", type=int, default=0, help="ONNX Runtime threads for Kokoro (0: one per logical CPU), as LLMOS_SPEECH_TTS_THREADS")
    parser.add_argument("--voice-turns", type=int, default=10, help="voice turns through a private stack (0: skip)")
    parser.add_argument("--voice-only", action="store_true",
                        help="only the voice turns: the ASR and TTS engine figures already in --results are kept")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.voice_only:
        results: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {}
        results["voice_turns"] = voice = voice_turns(args.voice_turns)
        print_voice_turns(voice)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.results}")
        return
    # Timings on a shared two-core machine say little without how busy it was.
    results = {"load_average_1m_at_start": os.getloadavg()[0], "asr": asr(args.data, args.clips)}
    model = KokoroModel(artefact_dir(args.home, "kokoro-82m"), ["CPUExecutionProvider"], args.tts_threads)
    results["kokoro_jm_kumo"] = tts(KokoroVoice(model, "jm_kumo"), args.repeats)
    results["espeak_ng"] = tts(EspeakVoice(), args.repeats)

    a = results["asr"]
    print(f"{'measure':<44} {'ours':>8} {'reference':>10} {'target':>8}")
    print(f"{'ASR RTF (endpointed, ' + str(a['clips']) + ' clips)':<44} {a['service_rtf']:>8.2f} {a['plain_pocketsphinx_rtf']:>10.2f} {'<= 0.30':>8}")
    for name in ("kokoro_jm_kumo", "espeak_ng"):
        r = results[name]
        target = "<= 1.00" if name.startswith("kokoro") else ""
        print(f"{name + ' first audio, short sentence (s)':<44} {r['first_audio_p50_s']:>8.2f} {'':>10} {target:>8}")
        print(f"{name + ' first piece of an answer (s)':<44} {r['answer_first_piece_p50_s']:>8.2f}")
        print(f"{name + ' RTF (3 sentences)':<44} {r['rtf']:>8.2f}")
    print("reference: plain whole-clip PocketSphinx decode of the same clips in this run")
    if args.voice_turns:
        results["voice_turns"] = voice = voice_turns(args.voice_turns)
        print_voice_turns(voice)
    results["load_average_1m_at_end"] = os.getloadavg()[0]
    print(f"load average (1 min) at start {results['load_average_1m_at_start']:.1f}, at end {results['load_average_1m_at_end']:.1f}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
