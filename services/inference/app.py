"""How the inference service is assembled: models, embed batcher, generation scheduler, transports."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from llmos.bus.broker import Bus
from llmos.embedding import EmbeddingModel
from llmos.models.store import artefact_dir
from llmos.service import GrpcBinding, ServiceDefinition, ServiceParts
from llmos.tokenization import ModelTokenizer
from llmos.v1 import inference_pb2, inference_pb2_grpc
from services.inference.batching import EmbedBatcher
from services.inference.core import (
    CPU,
    EMBEDDING_MODEL,
    GENERATION_MODEL,
    EmbedLimits,
    InferenceCore,
    ServedModel,
    execution_providers,
)
from services.inference.decoder import Decoder
from services.inference.handlers import subscriptions
from services.inference.scheduler import AdmissionLimits, GenerationScheduler, PrefixCache
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings

# The generation engine binds its KV cache in host memory, which only the CPU provider runs in
# place; embeddings follow LLMOS_EXECUTION_PROVIDER.
GENERATION_VARIANT = "cpu-int4"
EMBEDDING_VARIANT = "fp32"


async def build(settings: InferenceSettings, bus: Bus) -> ServiceParts:
    threads = settings.inference_threads
    reported_threads = threads or os.cpu_count() or 1
    providers = execution_providers(settings.execution_provider)

    embedding_dir = artefact_dir(settings.home, EMBEDDING_MODEL, EMBEDDING_VARIANT)
    embedding_model = EmbeddingModel.from_dir(embedding_dir, providers, threads)
    batcher = EmbedBatcher(
        embedding_model.embed,
        settings.inference_embed_max_batch,
        settings.inference_embed_max_batch_tokens,
        settings.inference_embed_max_delay_ms / 1000,
        settings.inference_embed_queue_size,
    )

    generation_dir = artefact_dir(settings.home, GENERATION_MODEL, GENERATION_VARIANT)
    decoder = Decoder(
        generation_dir, [CPU], threads, settings.inference_max_batch, settings.inference_max_context,
        settings.inference_thread_spinning,
    )
    tokenizer = ModelTokenizer.from_dir(generation_dir)
    scheduler = GenerationScheduler(
        decoder,
        tokenizer,
        settings.inference_queue_size,
        settings.inference_reserved_interactive_slots,
        PrefixCache(settings.inference_prefix_cache_tokens, settings.inference_prefix_cache_min_tokens),
        AdmissionLimits(settings.inference_interactive_max_wait_s or None, settings.inference_max_wait_s or None),
    )

    core = InferenceCore(
        bus,
        settings.home,
        batcher,
        embedding_model.count_tokens,
        EmbedLimits(settings.inference_embed_max_request_texts, settings.inference_embed_max_text_chars),
        ServedModel(
            EMBEDDING_MODEL, inference_pb2.MODEL_ROLE_EMBEDDING, EMBEDDING_VARIANT, embedding_dir,
            embedding_model.providers[0], embedding_model.pooling.max_seq_length, embedding_model.dimension,
            reported_threads,
        ),
        scheduler,
        tokenizer,
        ServedModel(
            GENERATION_MODEL, inference_pb2.MODEL_ROLE_GENERATION, GENERATION_VARIANT, generation_dir,
            decoder.providers[0], decoder.max_context, 0, reported_threads,
        ),
        settings.inference_max_new_tokens,
        settings.inference_default_max_new_tokens,
    )
    batcher.start()
    scheduler.start()

    async def close() -> None:
        await scheduler.stop()
        await batcher.stop()

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
