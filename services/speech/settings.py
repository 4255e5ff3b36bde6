from __future__ import annotations

from pathlib import Path

from llmos.settings import PlatformSettings

DEMO = Path(__file__).resolve().parents[2] / "demo"


class SpeechSettings(PlatformSettings):
    # PocketSphinx decoders in the pool: concurrent segments being decoded (about 100 MB each).
    speech_decoders: int = 2
    # How long a request waits for a free decoder before RESOURCE_EXHAUSTED.
    speech_decoder_wait_s: float = 10.0
    # Longest clip Recognize accepts, in seconds (a StreamingRecognize stream lasts at most LLMOS_MAX_STREAM_S).
    speech_max_clip_s: float = 600.0
    # Interim results are computed after this much new speech.
    speech_interim_interval_ms: int = 300
    # Default endpointing (a request's EndpointingConfig overrides each non-zero field).
    speech_start_history_ms: int = 300
    speech_start_threshold: float = 0.6
    speech_stop_history_ms: int = 700
    speech_stop_threshold: float = 0.9
    # A segment that never pauses is cut after this long.
    speech_max_segment_ms: int = 30_000
    # Voice-activity detector aggressiveness, 0 (loose) to 3 (strict).
    speech_vad_mode: int = 2
    # Share of a domain model's unigram probability that comes from the tenant's text; the rest
    # comes from the general model, so words the text never uses can still be recognized.
    speech_domain_weight: float = 0.97
    # A domain-model result less confident than this is decoded again with the general model.
    speech_domain_min_confidence: float = 0.5
    # Seed text of domain models, `tenant=path[;path…]` entries separated by commas; paths are
    # .md/.txt articles, .yaml intent files, or folders of them.
    speech_domain_seed: str = ""
    # Tenants that get a domain model, comma-separated; empty: every tenant not excluded below.
    speech_domain_lm_tenants: str = ""
    # Tenants that never get one (a throwaway evaluation tenant): their documents are not
    # fetched when indexed and no model is rebuilt; they are heard with the general model.
    speech_domain_lm_exclude: str = ""
    # A tenant's model is rebuilt this long after the first change of a burst; changes meanwhile,
    # or during the rebuild, are folded into one rebuild (at most one in flight per tenant).
    speech_domain_lm_settle_s: float = 1.0
    # Intent examples (the dialogue's intents file) added to every tenant's domain model, so the
    # way customers phrase requests is known too; empty: none.
    speech_intents_file: str = str(DEMO / "intents.yaml")
    # Voice used when a request names none; Kokoro voices, or espeak-en-us.
    speech_default_voice: str = "jm_kumo"
    # Longest text Synthesize accepts, in characters.
    speech_max_text_chars: int = 5000
    # ONNX Runtime threads for Kokoro (0: one per logical CPU).
    speech_tts_threads: int = 0
