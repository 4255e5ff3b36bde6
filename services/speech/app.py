"""How the speech service is assembled: recognizer pool, voices, domain corpus, transports."""

from __future__ import annotations

import logging
from pathlib import Path

from llmos.audio import EndpointConfig
from llmos.audit import AuditLog
from llmos.auth import check_tenant
from llmos.bus.broker import Bus
from llmos.clients import RetrievalClient
from llmos.crypto import AtRest
from llmos.errors import FailedPrecondition, InvalidArgument
from llmos.grpcutil.client import service_channel
from llmos.models import artefact_dir
from llmos.service import GrpcBinding, ServiceDefinition, ServiceParts
from llmos.settings import ExecutionProvider
from llmos.v1 import speech_pb2, speech_pb2_grpc
from services.speech.asr import AsrEngine
from services.speech.core import DocumentText, RecognitionLimits, SpeechCore
from services.speech.domain import DomainCorpus, DomainModelPolicy, general_unigrams, intent_examples, read_seed, tenant_list
from services.speech.handlers import subscriptions
from services.speech.servicer import SpeechServicer
from services.speech.settings import SpeechSettings
from services.speech.tts import EspeakVoice, KokoroModel, KokoroVoice, VoiceCatalog, espeak_available

logger = logging.getLogger(__name__)

GET_DOCUMENT_TIMEOUT_S = 30.0
KOKORO = "kokoro-82m"
WARM_UP_TEXT = "Thank you for calling, how can I help?"


def parse_seed(spec: str) -> dict[str, list[Path]]:
    """`tenant=path[;path…],…` -> paths by tenant."""
    seeds: dict[str, list[Path]] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        tenant, sep, paths = entry.partition("=")
        if not sep or not tenant or not paths:
            raise InvalidArgument("LLMOS_SPEECH_DOMAIN_SEED", f"entry {entry!r} is not tenant=path[;path…]")
        try:
            check_tenant(tenant)
        except InvalidArgument as exc:
            raise InvalidArgument("LLMOS_SPEECH_DOMAIN_SEED", exc.message) from None
        for path in (Path(p) for p in paths.split(";") if p):
            if not path.exists():
                raise InvalidArgument("LLMOS_SPEECH_DOMAIN_SEED", f"{path} does not exist")
            seeds.setdefault(tenant, []).append(path)
    return seeds


def _providers(settings: SpeechSettings) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if settings.execution_provider is not ExecutionProvider.CPU and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def voice_catalog(settings: SpeechSettings) -> VoiceCatalog:
    if not espeak_available():
        raise FailedPrecondition("espeak-ng is not installed: `apt-get install espeak-ng` (Kokoro needs its phonemes too)")
    model = KokoroModel(artefact_dir(settings.home, KOKORO), _providers(settings), settings.speech_tts_threads)
    model.warm_up()
    logger.info("kokoro on %s", ", ".join(model.providers))
    voices = [KokoroVoice(model, name) for name in sorted(model.styles)]
    catalog = VoiceCatalog([*voices, EspeakVoice("en-us"), EspeakVoice("en-gb")], settings.speech_default_voice)
    # The default voice speaks once, espeak-ng's phonemes included, so the first caller's first piece
    # is not the one that loads espeak-ng's data and sizes the model's buffers for a clause.
    catalog.get("").speak(WARM_UP_TEXT, 1.0)
    return catalog


def shared_domain_text(settings: SpeechSettings) -> str:
    if not settings.speech_intents_file:
        return ""
    path = Path(settings.speech_intents_file)
    if not path.is_file():
        raise InvalidArgument("LLMOS_SPEECH_INTENTS_FILE", f"{path} is not a file; give the intents YAML, or empty for none")
    return "\n".join(intent_examples(path))


def corpus_at_rest(settings: SpeechSettings) -> AtRest:
    """The domain corpus holds every tenant's document text: sealed like every store of it."""
    return AtRest.from_settings(settings, "the speech corpus")


def domain_model_policy(settings: SpeechSettings) -> DomainModelPolicy:
    return DomainModelPolicy(
        settings.speech_domain_lm_settle_s,
        tenant_list("LLMOS_SPEECH_DOMAIN_LM_TENANTS", settings.speech_domain_lm_tenants),
        tenant_list("LLMOS_SPEECH_DOMAIN_LM_EXCLUDE", settings.speech_domain_lm_exclude),
    )


def document_reader(retrieval: RetrievalClient) -> DocumentText:
    """Indexed documents' text for the domain corpus, read as the dialogue service reads them."""

    async def document_text(tenant: str, document_id: str) -> str:
        _, text = await retrieval.document(tenant, document_id, GET_DOCUMENT_TIMEOUT_S)
        return text

    return document_text


async def build(settings: SpeechSettings, bus: Bus) -> ServiceParts:
    seeds = parse_seed(settings.speech_domain_seed)
    policy = domain_model_policy(settings)
    if off := sorted(tenant for tenant in seeds if not policy.builds_for(tenant)):
        raise InvalidArgument("LLMOS_SPEECH_DOMAIN_SEED", f"seeds tenants whose domain models are off: {', '.join(off)}")
    channel = service_channel(settings, "speech", "retrieval")
    endpointing = EndpointConfig(
        settings.speech_start_history_ms, settings.speech_start_threshold,
        settings.speech_stop_history_ms, settings.speech_stop_threshold, settings.speech_max_segment_ms,
    ).validated()
    engine = AsrEngine(settings.speech_decoders, settings.speech_decoder_wait_s, settings.speech_domain_min_confidence)
    with engine.decoder(None) as (decoder, general_search, _):
        background = general_unigrams(decoder, general_search)
    core = SpeechCore(
        bus,
        AuditLog(bus, bus.service),
        engine,
        DomainCorpus(
            settings.home / "speech" / "corpus", corpus_at_rest(settings),
            shared_domain_text(settings), background, settings.speech_domain_weight,
        ),
        voice_catalog(settings),
        RecognitionLimits(settings.speech_max_clip_s, settings.speech_interim_interval_ms, settings.speech_vad_mode, endpointing),
        settings.speech_max_text_chars,
        document_reader(RetrievalClient(channel)),
        policy,
    )

    async def close() -> None:
        await core.rebuilds_settled()
        await channel.close()

    for tenant, paths in seeds.items():
        await core.seed(tenant, [document for path in paths for document in read_seed(path)])
    return ServiceParts(
        grpc=[GrpcBinding.of(speech_pb2, "SpeechService", SpeechServicer(core), speech_pb2_grpc.add_SpeechServiceServicer_to_server)],
        subscriptions=subscriptions(core),
        close=close,
    )


DEFINITION = ServiceDefinition("speech", SpeechSettings, build)
