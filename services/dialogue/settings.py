from __future__ import annotations

from pathlib import Path

from pydantic import NonNegativeFloat, PositiveInt, field_validator

from llmos.settings import PlatformSettings

DEMO = Path(__file__).resolve().parents[2] / "demo"


class DialogueSettings(PlatformSettings):
    # Intents file the classifier is trained from (artefact under $LLMOS_HOME/intents, rebuilt when it changes).
    dialogue_intents_file: Path = DEMO / "intents.yaml"
    # Out-of-fold in-scope accuracy the out-of-scope threshold must keep (higher: fewer rejections).
    dialogue_intent_target_accuracy: float = 0.95
    # The assistant's voice: the company it speaks for and its scripted replies.
    dialogue_assistant_file: Path = DEMO / "assistant.yaml"
    # Orders the order-status flow can look up (a stand-in for the order system).
    dialogue_orders_file: Path = DEMO / "orders.yaml"
    # A session untouched this long is gone (the KV bucket itself keeps entries at most 24 h).
    dialogue_session_idle_ttl_s: float = 1800.0
    dialogue_max_message_chars: int = 2000
    # The model's context window (summaries), and how many passages a question retrieves.
    dialogue_context_tokens: int = 2048
    dialogue_top_k: int = 4
    # A spoken answer (Converse, or ChatRequest.spoken) holds at most this many sentences.
    dialogue_spoken_answer_sentences: int = 2
    dialogue_recent_turns: int = 4
    # Grounded answers (chosen on the development set demo/questions.yaml with `llmos eval answers`):
    # at most this many source sentences answer a question; under this evidence score the help
    # centre does not answer it; a model draft is sent only when each of its sentences has this
    # share of its content words in one evidence sentence (and every fact of it is in the evidence).
    dialogue_evidence_sentences: int = 3
    dialogue_min_evidence_score: float = 0.2
    dialogue_min_draft_support: float = 0.8
    dialogue_drafts: bool = False
    dialogue_draft_max_tokens: int = 64
    # A scripted intent (greeting, order status, a person) this confident takes over, unless the
    # evidence scores this much above the minimum.
    dialogue_script_confidence: float = 0.9
    dialogue_strong_evidence_margin: float = 0.3
    # Limit of each call to another service when the client set no deadline (else: its deadline).
    dialogue_call_timeout_s: float = 60.0
    # A Chat turn expected to wait longer than this behind the turns in flight (from their measured
    # pace) is refused at once with RESOURCE_EXHAUSTED and a retry hint, as is one expected to finish
    # after its deadline; 0: only deadlines refuse.
    dialogue_max_turn_wait_s: NonNegativeFloat = 10.0
    # Summaries: default length, and the longest text accepted.
    dialogue_summary_words: int = 60
    dialogue_max_summary_source_chars: int = 400_000
    # Generate calls one abstractive summary may make (map parts and reductions); a longer text is
    # first cut down to its highest-ranked sentences that fit.
    dialogue_summary_max_generate_calls: PositiveInt = 8
    # Voice turns: user speech over an answer (barge-in) is this much audio, at least this share
    # of it voiced, by a voice-activity detector of this aggressiveness (0 loose - 3 strict).
    dialogue_barge_in_start_ms: int = 300
    dialogue_barge_in_threshold: float = 0.6
    dialogue_vad_mode: int = 2

    @field_validator("dialogue_intent_target_accuracy")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError("must be in (0, 1]")
        return value
