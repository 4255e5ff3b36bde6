"""`python -m bench.speech`: ASR real-time factor, TTS real-time factor, time to first audio.

Runs the service's own engines in-process (no network): PocketSphinx through the endpointed
recognizer on the shared recordings, beside a plain whole-clip PocketSphinx decode as the
reference measured in the same run; Kokoro and espeak-ng through the voices SynthesizeStream
uses, timing the first sentence (time to first audio chunk) and the whole text. Targets on this
machine: ASR RTF <= 0.3, Kokoro first audio <= 1 s for a short sentence.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from pocketsphinx import Decoder

from llmos.audio import Encoding, EndpointConfig, decode_clip, resample, samples_to_pcm
from llmos.cli.speech import audio_request_bytes
from llmos.models import artefact_dir
from services.speech.asr import AsrEngine, recognize_clip
from llmos.utterances import split_for_speech
from services.speech.tts import EspeakVoice, KokoroModel, KokoroVoice

RESULTS = Path("bench/results/speech.json")
SHORT = "Your order has shipped."
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
    voice.speak("Hello.", 1.0)  # warm-up: first inference allocates
    first, rtf = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        audio = voice.speak(SHORT, 1.0)
        first.append(time.perf_counter() - started)
    for _ in range(max(1, repeats // 2)):
        started = time.perf_counter()
        total = sum(len(voice.speak(sentence, 1.0)) for sentence in split_sentences(LONG))
        rtf.append((time.perf_counter() - started) / (total / voice.info.sample_rate))
    return {
        "first_audio_p50_s": statistics.median(first),
        "first_audio_max_s": max(first),
        "short_sentence_audio_s": len(audio) / voice.info.sample_rate,
        "rtf": statistics.median(rtf),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/speech"))
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--home", type=Path, default=Path(".llmos"))
    args = parser.parse_args()

    results: dict[str, object] = {"asr": asr(args.data, args.clips)}
    model = KokoroModel(artefact_dir(args.home, "kokoro-82m"), ["CPUExecutionProvider"])
    results["kokoro_jm_kumo"] = tts(KokoroVoice(model, "jm_kumo"), args.repeats)
    results["espeak_ng"] = tts(EspeakVoice(), args.repeats)

    a = results["asr"]
    print(f"{'measure':<44} {'ours':>8} {'reference':>10} {'target':>8}")
    print(f"{'ASR RTF (endpointed, ' + str(a['clips']) + ' clips)':<44} {a['service_rtf']:>8.2f} {a['plain_pocketsphinx_rtf']:>10.2f} {'<= 0.30':>8}")
    for name in ("kokoro_jm_kumo", "espeak_ng"):
        r = results[name]
        target = "<= 1.00" if name.startswith("kokoro") else ""
        print(f"{name + ' first audio, short sentence (s)':<44} {r['first_audio_p50_s']:>8.2f} {'':>10} {target:>8}")
        print(f"{name + ' RTF (3 sentences)':<44} {r['rtf']:>8.2f}")
    print("reference: plain whole-clip PocketSphinx decode of the same clips in this run")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
