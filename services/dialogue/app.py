"""How the dialogue service is assembled: intent classifier, clients of the other services, core."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llmos.audio import EndpointConfig
from llmos.audit import AuditLog
from llmos.bus.broker import Bus
from llmos.clients import InferenceClient, RetrievalClient, SpeechClient, TokenizerClient
from llmos.crypto import AtRest
from llmos.grpcutil.client import service_channel
from llmos.intents import ensure_intent_classifier
from llmos.models import artefact_dir
from llmos.service import GrpcBinding, ServiceDefinition, ServiceParts
from llmos.v1 import common_pb2, dialogue_pb2, dialogue_pb2_grpc
from services.dialogue.backends import Backends, GrpcGenerator, GrpcRetriever, LocalEmbedder
from services.dialogue.core import DialogueCore, DialogueLimits
from services.dialogue.answers import GroundingLimits
from services.dialogue.handlers import subscriptions
from services.dialogue.replies import load_assistant
from services.dialogue.servicer import DialogueServicer
from services.dialogue.sessions import SESSIONS_BUCKET, SessionStore
from services.dialogue.settings import DialogueSettings
from services.dialogue.slots import OrderBook
from services.dialogue.voice import VoiceLimits, VoiceTurns


def limits_of(settings: DialogueSettings) -> DialogueLimits:
    return DialogueLimits(
        max_message_chars=settings.dialogue_max_message_chars,
        context_tokens=settings.dialogue_context_tokens,
        recent_turns=settings.dialogue_recent_turns,
        top_k=settings.dialogue_top_k,
        call_timeout_s=settings.dialogue_call_timeout_s,
        summary_words=settings.dialogue_summary_words,
        max_summary_source_chars=settings.dialogue_max_summary_source_chars,
        summary_max_generate_calls=settings.dialogue_summary_max_generate_calls,
        grounding=GroundingLimits(
            evidence_sentences=settings.dialogue_evidence_sentences,
            min_evidence_score=settings.dialogue_min_evidence_score,
            min_support=settings.dialogue_min_draft_support,
            drafts=settings.dialogue_drafts,
            draft_max_tokens=settings.dialogue_draft_max_tokens,
            spoken_sentences=settings.dialogue_spoken_answer_sentences,
        ),
        script_confidence=settings.dialogue_script_confidence,
        strong_evidence_margin=settings.dialogue_strong_evidence_margin,
        max_turn_wait_s=settings.dialogue_max_turn_wait_s or None,
    )


def voice_limits_of(settings: DialogueSettings) -> VoiceLimits:
    speech_start = EndpointConfig(
        start_history_ms=settings.dialogue_barge_in_start_ms, start_threshold=settings.dialogue_barge_in_threshold
    ).validated()
    return VoiceLimits(settings.dialogue_vad_mode, speech_start, settings.dialogue_call_timeout_s)


async def build(settings: DialogueSettings, bus: Bus) -> ServiceParts:
    assistant = load_assistant(settings.dialogue_assistant_file)
    # The classifier is trained here when its artefact is missing, with the same MiniLM the
    # inference service serves (loaded only then); at run time the inference service embeds.
    async def embed_locally(texts: Sequence[str]) -> np.ndarray:
        return await LocalEmbedder.from_dir(artefact_dir(settings.home, "all-minilm-l6-v2")).embed(texts)

    classifier = await ensure_intent_classifier(
        settings.home, settings.dialogue_intents_file, embed_locally, settings.dialogue_intent_target_accuracy
    )
    channels = [
        service_channel(settings, "dialogue", "inference"),
        service_channel(settings, "dialogue", "retrieval"),
        service_channel(settings, "dialogue", "tokenizer"),
        service_channel(settings, "dialogue", "speech"),
    ]
    inference, retrieval, tokenizer, speech = channels
    inference_client = InferenceClient(inference)
    backends = Backends(
        inference_client, GrpcRetriever(RetrievalClient(retrieval)), GrpcGenerator(inference_client), TokenizerClient(tokenizer),
        # Interactive requests go first; a summary's long prompts are prefilled in pieces between decode steps.
        summary_generator=GrpcGenerator(inference_client, common_pb2.PRIORITY_STANDARD),
    )
    core = DialogueCore(
        bus,
        SessionStore(
            bus.bucket(SESSIONS_BUCKET), settings.dialogue_session_idle_ttl_s, AtRest.from_settings(settings, "dialogue session state")
        ),
        AuditLog(bus, bus.service),
        classifier,
        backends,
        OrderBook.from_file(settings.dialogue_orders_file),
        limits_of(settings),
        assistant,
    )

    speech_client = SpeechClient(speech)
    voice = VoiceTurns(core, speech_client, speech_client, voice_limits_of(settings))

    async def close() -> None:
        for channel in channels:
            await channel.close()

    return ServiceParts(
        grpc=[GrpcBinding.of(dialogue_pb2, "DialogueService", DialogueServicer(core, voice), dialogue_pb2_grpc.add_DialogueServiceServicer_to_server)],
        subscriptions=subscriptions(core),
        close=close,
    )


DEFINITION = ServiceDefinition("dialogue", DialogueSettings, build)
