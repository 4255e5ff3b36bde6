"""How the inference service is assembled: models, embed batcher, generation scheduler, transports."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from llmos.bus.broker import Bus
from llmos.errors import InvalidArgument
from llmos.embedding import EmbeddingModel
from llmos.models.catalog import CATALOG, Role, get_spec
from llmos.models.manifest import artefact_problems
from llmos.models.pooling import PoolingConfig
from llmos.models.store import artefact_dir, registered_models
from llmos.service import GrpcBinding, ServiceDefinition, ServiceParts
from llmos.tokenization import ModelTokenizer
from llmos.v1 import inference_pb2, inference_pb2_grpc
from services.inference.batching import LANES, EmbedBatcher
from services.inference.core import (
    EMBEDDING_MODEL,
    EmbeddingModels,
    EmbedLimits,
    GenerationModel,
    GenerationModels,
    InferenceCore,
    LoadedEmbeddingModel,
)
from services.inference.decoder import Decoder, DecoderConfig
from services.inference.device_cache import DeviceCacheDecoder
from services.inference.devices import CPU_GENERATION_VARIANTS, DevicePlan, check_session_provider, device_plan
from services.inference.handlers import subscriptions
from services.inference.model_pool import ModelCandidate, ServedModel
from services.inference.scheduler import PREFILL_CHUNK_TOKENS, AdmissionLimits, GenerationScheduler, PrefixCache
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceDevice, InferenceSettings

# The catalog generation variant served on the CPU (LLMOS_INFERENCE_DEVICE=cpu, the default).
GENERATION_VARIANT = CPU_GENERATION_VARIANTS[0]
_FLOAT32_BYTES = 4
# Float32 activations an encoder layer keeps live per token, in hidden widths: the feed-forward
# layer's 4x, queries, keys, values, attention output and residuals, with margin.
_EMBED_ACTIVATION_WIDTHS = 16


def _files_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def generation_footprint(folder: Path, max_batch: int, max_context: int) -> int:
    """Bytes a loaded generation model takes: its files (weights), the slot KV cache the decoder
    preallocates (float32, every layer), and the logits buffer. Counted for the worst case: a graph
    built before its logits were cut to the last position gives logits for every position it runs,
    so a prompt piece of PREFILL_CHUNK_TOKENS needs that many rows (with Gemma 3's 262k vocabulary,
    268 MB), more than a decode step's `max_batch`."""
    config = DecoderConfig.load(folder)
    context = min(max_context, config.context_length)
    kv_cache = 2 * config.num_layers * max_batch * config.kv_heads * context * config.head_size * _FLOAT32_BYTES
    logits_rows = max(max_batch, PREFILL_CHUNK_TOKENS)
    return _files_size(folder) + kv_cache + logits_rows * config.vocab_size * _FLOAT32_BYTES


def embedding_footprint(folder: Path, max_batch_tokens: int) -> int:
    """Bytes a loaded embedding model takes: its files (weights) and the activations of one model
    call of `max_batch_tokens` padded tokens on each lane of its batcher."""
    activations = max_batch_tokens * PoolingConfig.load(folder).dimension * _EMBED_ACTIVATION_WIDTHS * _FLOAT32_BYTES
    return _files_size(folder) + len(LANES) * activations


def has_chat_template(folder: Path) -> bool:
    """Whether the artefact's tokenizer has a chat template (a base model has none)."""
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


def generation_candidates(
    settings: InferenceSettings, plan: DevicePlan, threads: int
) -> Callable[[], dict[str, ModelCandidate]]:
    """The built generation models the device runs: the catalog's and those added with `llmos models add`
    (read again on each call, so a model added while the service runs can be asked for)."""

    def candidate(name: str, variant: str, folder: Path, source: str) -> ModelCandidate:
        context = min(settings.inference_max_context, DecoderConfig.load(folder).context_length)
        served = ServedModel(name, inference_pb2.MODEL_ROLE_GENERATION, variant, folder, "", context, 0, threads, source)
        return ModelCandidate(served, generation_footprint(folder, settings.inference_max_batch, settings.inference_max_context))

    def candidates() -> dict[str, ModelCandidate]:
        found: dict[str, ModelCandidate] = {}
        for spec in CATALOG.values():
            variant = plan.generation_variant
            folder = spec.folder(settings.home, variant) if variant in spec.variants else None
            if spec.role is Role.GENERATION and folder is not None and not artefact_problems(folder, check_hashes=False):
                found[spec.name] = candidate(spec.name, variant, folder, spec.source.package)
        for model in registered_models(settings.home).values():
            folder = model.folder(settings.home)
            if (model.role == Role.GENERATION.value and model.variant in plan.generation_variants
                    and not artefact_problems(folder, check_hashes=False)):
                found[model.name] = candidate(model.name, model.variant, folder, f"{model.source_format}:{model.source}")
        return found

    return candidates


def generation_loader(
    settings: InferenceSettings, plan: DevicePlan, threads: int
) -> Callable[[ModelCandidate], GenerationModel]:
    # On CUDA the slot KV cache lives in GPU memory; on the CPU in numpy arrays the provider updates in place.
    engine = Decoder if plan.device is InferenceDevice.CPU else DeviceCacheDecoder

    def load(candidate: ModelCandidate) -> GenerationModel:
        folder = candidate.served.folder
        decoder = engine(
            folder, plan.generation_providers, settings.inference_threads, settings.inference_max_batch,
            settings.inference_max_context, settings.inference_thread_spinning,
        )
        check_session_provider(f"generation model {candidate.served.name}", plan.generation_providers, decoder.providers)
        tokenizer = ModelTokenizer.from_dir(folder)
        scheduler = GenerationScheduler(
            decoder,
            tokenizer,
            settings.inference_queue_size,
            settings.inference_reserved_interactive_slots,
            PrefixCache(settings.inference_prefix_cache_tokens, settings.inference_prefix_cache_min_tokens),
            AdmissionLimits(settings.inference_interactive_max_wait_s or None, settings.inference_max_wait_s or None),
        )
        served = candidate.served
        return GenerationModel(
            ServedModel(served.name, served.role, served.variant, folder, decoder.providers[0], decoder.max_context, 0,
                        threads, served.source),
            scheduler,
            tokenizer,
            has_chat_template(folder),
            candidate.nbytes,
        )

    return load


def embedding_candidates(settings: InferenceSettings, threads: int) -> Callable[[], dict[str, ModelCandidate]]:
    """The built embedding models: the catalog's one, in the variant of
    LLMOS_INFERENCE_EMBEDDING_VARIANT, and those added with `llmos models add --role embedding`
    (read again on each call, like generation_candidates)."""

    def candidate(name: str, variant: str, folder: Path, source: str) -> ModelCandidate:
        pooling = PoolingConfig.load(folder)
        served = ServedModel(
            name, inference_pb2.MODEL_ROLE_EMBEDDING, variant, folder, "", pooling.max_seq_length, pooling.dimension, threads, source
        )
        return ModelCandidate(served, embedding_footprint(folder, settings.inference_embed_max_batch_tokens))

    def candidates() -> dict[str, ModelCandidate]:
        found: dict[str, ModelCandidate] = {}
        variant = settings.inference_embedding_variant.value
        for spec in CATALOG.values():
            folder = spec.folder(settings.home, variant) if variant in spec.variants else None
            if spec.role is Role.EMBEDDING and folder is not None and not artefact_problems(folder, check_hashes=False):
                found[spec.name] = candidate(spec.name, variant, folder, spec.source.package)
        for model in registered_models(settings.home).values():
            folder = model.folder(settings.home)
            if model.role == Role.EMBEDDING.value and not artefact_problems(folder, check_hashes=False):
                found[model.name] = candidate(model.name, model.variant, folder, f"{model.source_format}:{model.source}")
        return found

    return candidates


def embedding_loader(settings: InferenceSettings, plan: DevicePlan) -> Callable[[ModelCandidate], LoadedEmbeddingModel]:
    """Each embedding model gets its own session and batcher, with the same batching settings."""

    def load(candidate: ModelCandidate) -> LoadedEmbeddingModel:
        served = candidate.served
        model = EmbeddingModel.from_dir(served.folder, plan.embedding_providers, settings.inference_threads)
        check_session_provider(f"embedding model {served.name}", plan.embedding_providers, model.providers)
        batcher = EmbedBatcher(
            model.embed,
            settings.inference_embed_max_batch,
            settings.inference_embed_max_batch_tokens,
            settings.inference_embed_max_delay_ms / 1000,
            settings.inference_embed_queue_size,
        )
        return LoadedEmbeddingModel(replace(served, execution_provider=model.providers[0]), model, batcher, candidate.nbytes)

    return load


async def build(settings: InferenceSettings, bus: Bus) -> ServiceParts:
    reported_threads = settings.inference_threads or os.cpu_count() or 1
    plan = device_plan(settings.inference_device, settings.execution_provider)

    artefact_dir(settings.home, EMBEDDING_MODEL, settings.inference_embedding_variant.value)  # not built: the error says how to build it
    embeddings = EmbeddingModels(
        EMBEDDING_MODEL,
        embedding_candidates(settings, reported_threads),
        embedding_loader(settings, plan),
        settings.inference_embedding_memory_mb << 20,
        keep_default_loaded=True,
    )
    await embeddings.load(EMBEDDING_MODEL)  # the knowledge base's model serves from the first chunk

    default = settings.inference_generation_model
    if default in CATALOG:
        artefact_dir(settings.home, default, plan.generation_variant)  # not built: the error says how to build it
        if get_spec(default).role is not Role.GENERATION:
            raise InvalidArgument("LLMOS_INFERENCE_GENERATION_MODEL", f"{default!r} is not a generation model")
    generation = GenerationModels(
        default,
        generation_candidates(settings, plan, reported_threads),
        generation_loader(settings, plan, reported_threads),
        settings.inference_generation_memory_mb << 20,
    )
    try:
        default_model = await generation.load(default)  # the dialogue's model serves from the first request
    except InvalidArgument as exc:
        raise InvalidArgument("LLMOS_INFERENCE_GENERATION_MODEL", exc.message) from None
    if not default_model.chat:
        await generation.close()
        await embeddings.close()
        raise InvalidArgument(
            "LLMOS_INFERENCE_GENERATION_MODEL",
            f"{default!r} has no chat template (a base model); the dialogue's model must be able to chat",
        )

    core = InferenceCore(
        bus,
        embeddings,
        EmbedLimits(settings.inference_embed_max_request_texts, settings.inference_embed_max_text_chars),
        generation,
        settings.inference_max_new_tokens,
        settings.inference_default_max_new_tokens,
    )

    async def close() -> None:
        await generation.close()
        await embeddings.close()

    return ServiceParts(
        grpc=[
            GrpcBinding.of(
                inference_pb2,
                "InferenceService",
                InferenceServicer(core),
                inference_pb2_grpc.add_InferenceServiceServicer_to_server,
            )
        ],
        subscriptions=subscriptions(core, settings.inference_chunk_workers),
        close=close,
    )


DEFINITION = ServiceDefinition("inference", InferenceSettings, build)
