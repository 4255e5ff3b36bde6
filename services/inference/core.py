"""Inference logic shared by the gRPC API and the `llmos.chunks.created` consumer.

Embeddings go through the dynamic batcher of the model a request names, generation through
the continuous-batching scheduler of the model a request names: each role keeps several models
(EmbeddingModels, GenerationModels), loaded on first use within a memory budget, the least
recently used idle one unloaded to make room. Chunks are embedded with the default embedding
model only: the knowledge base's index holds its vectors, and another model's do not compare
with them. Validation happens here so both transports reject the same input the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
from opentelemetry import metrics, trace
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_OPERATION_NAME,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_REQUEST_TEMPERATURE,
    GEN_AI_REQUEST_TOP_K,
    GEN_AI_REQUEST_TOP_P,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    GenAiOperationNameValues,
)
from opentelemetry.semconv._incubating.metrics.gen_ai_metrics import (
    GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
    GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
)
from opentelemetry.trace import Status, StatusCode

from llmos.bus.subjects import CHUNKS_EMBEDDED
from llmos.deadline import Deadline
from llmos.embedding import EmbeddingModel
from llmos.errors import InvalidArgument, LlmosError
from llmos.ports import Publisher
from llmos.telemetry import TIME_PER_OUTPUT_TOKEN_BUCKETS_S, TIME_TO_FIRST_TOKEN_BUCKETS_S, seconds_histogram
from llmos.tokenization import ModelTokenizer
from llmos.v1 import common_pb2, events_pb2, inference_pb2
from services.inference.batching import PRIORITY_NAMES, EmbedBatcher, priority_rank
from services.inference.devices import CPU  # noqa: F401 (imported from here by the tests)
from services.inference.model_pool import ModelPool, ServedModel
from services.inference.scheduler import FinishReason, GenerationRequest, GenerationScheduler, SamplingConfig, StreamEvent, Usage

GENERATION_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_TEMPERATURE = 2.0
# gen_ai.provider.name of what this service serves: the conventions list hosted APIs only, so the
# runtime that runs the models names it.
GEN_AI_PROVIDER = "onnxruntime"


@dataclass(frozen=True)
class GenerationModel:
    """A generation model in memory: its scheduler (and decoder), tokenizer and footprint."""

    served: ServedModel
    scheduler: GenerationScheduler
    tokenizer: ModelTokenizer
    chat: bool  # has a chat template; a base model answers plain prompts only
    nbytes: int  # estimated: weights, KV cache, logits

    def start(self) -> None:
        self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()


class GenerationModels(ModelPool[GenerationModel]):
    """Generation models by name; the default (the dialogue's) is loaded at start but may be
    unloaded like any other when idle."""

    ROLE = "generation"
    BUDGET_SETTING = "LLMOS_INFERENCE_GENERATION_MEMORY_MB"


@dataclass(frozen=True)
class LoadedEmbeddingModel:
    """An embedding model in memory: its session (tokenizer, pooling) and its own batcher."""

    served: ServedModel
    model: EmbeddingModel
    batcher: EmbedBatcher
    nbytes: int  # estimated: weights, one call's activations per batcher lane

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()


class EmbeddingModels(ModelPool[LoadedEmbeddingModel]):
    """Embedding models by name: the catalog's (the default, kept loaded: the knowledge base's
    index is made of its vectors) and those added with `llmos models add --role embedding`,
    loaded on first use within their own budget."""

    ROLE = "embedding"
    BUDGET_SETTING = "LLMOS_INFERENCE_EMBEDDING_MEMORY_MB"


@dataclass(frozen=True)
class EmbedResult:
    model: str  # the model that made the vectors
    vectors: np.ndarray
    prompt_tokens: int


@dataclass(frozen=True)
class EmbedLimits:
    max_texts: int
    max_text_chars: int


class InferenceCore:
    def __init__(
        self,
        publisher: Publisher,
        embeddings: EmbeddingModels,
        embed_limits: EmbedLimits,
        generation: GenerationModels,
        max_new_tokens: int,
        default_max_new_tokens: int,
    ) -> None:
        self._publisher = publisher
        self._embed_limits = embed_limits
        self.embeddings = embeddings
        self.generation = generation
        self._max_new_tokens = max_new_tokens
        self._default_max_new_tokens = default_max_new_tokens
        self._tracer = trace.get_tracer("llmos.inference")
        meter = metrics.get_meter("llmos.inference")
        self._time_to_first_token = seconds_histogram(
            meter,
            GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
            "arrival of a generation request to its first token, for successful responses",
            TIME_TO_FIRST_TOKEN_BUCKETS_S,
        )
        self._time_per_output_token = seconds_histogram(
            meter,
            GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
            "time per output token after the first, for successful responses",
            TIME_PER_OUTPUT_TOKEN_BUCKETS_S,
        )

    # Embeddings

    async def embed(self, model: str, texts: Sequence[str], priority: int) -> EmbedResult:
        """Vectors of `texts` by the embedding model named (empty: the default)."""
        limits = self._embed_limits
        if not texts:
            raise InvalidArgument("texts", f"at least 1 text is required (at most {limits.max_texts})")
        if len(texts) > limits.max_texts:
            raise InvalidArgument("texts", f"{len(texts)} texts is over the limit of {limits.max_texts} per call")
        for index, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(f"texts[{index}]", "is empty")
            if len(text) > limits.max_text_chars:
                raise InvalidArgument(
                    f"texts[{index}]", f"{len(text)} characters is over the limit of {limits.max_text_chars}"
                )
        async with self.embeddings.use(model) as embedding:
            tokens = await asyncio.to_thread(embedding.model.count_tokens, texts)
            vectors = await embedding.batcher.embed(texts, tokens, priority)
        return EmbedResult(embedding.served.name, vectors, sum(tokens))

    async def embed_chunks(self, created: events_pb2.ChunksCreated) -> None:
        """Embed a document's chunks and publish them on `llmos.chunks.embedded`.

        The message id derives from the document and its content hash, so JetStream drops the
        duplicate publish of a redelivered message; the vectors of a chunk id depend only on its
        text, so a late redelivery republishes the same upsert.
        """
        if not created.document_id or not created.tenant:
            raise InvalidArgument("document_id", "chunks must name their document and tenant")
        if not created.chunks:
            raise InvalidArgument("chunks", "the message carries no chunks")
        unique: dict[str, common_pb2.Chunk] = {}
        for index, chunk in enumerate(created.chunks):
            if not chunk.chunk_id:
                raise InvalidArgument(f"chunks[{index}].chunk_id", "is empty")
            if not chunk.text.strip():
                raise InvalidArgument(f"chunks[{index}].text", "is empty")
            unique.setdefault(chunk.chunk_id, chunk)
        chunks = list(unique.values())
        texts = [chunk.text for chunk in chunks]
        embedding = self.embeddings.default_model  # the index's model, kept loaded
        tokens = await asyncio.to_thread(embedding.model.count_tokens, texts)
        vectors = await embedding.batcher.embed(texts, tokens, created.priority, bounded=False)
        embedded = events_pb2.ChunksEmbedded(
            document_id=created.document_id,
            tenant=created.tenant,
            content_hash=created.content_hash,
            model=embedding.served.name,
            chunks=[
                events_pb2.EmbeddedChunk(chunk=chunk, vector=vector.tolist())
                for chunk, vector in zip(chunks, vectors, strict=True)
            ],
            priority=created.priority,
            submitted_at=created.submitted_at,
        )
        await self._publisher.publish(
            CHUNKS_EMBEDDED,
            embedded,
            msg_id=f"{created.tenant}/{created.document_id}/{created.content_hash}/embedded",
        )

    # Generation

    @staticmethod
    def _prompt_ids(request: inference_pb2.GenerateRequest, model: GenerationModel) -> list[int]:
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidArgument("input", "set either prompt or messages")
        tokenizer = model.tokenizer
        if which == "prompt":
            if not request.prompt.strip():
                raise InvalidArgument("prompt", "is empty")
            # A raw prompt is its caller's own, template and all: its special-token strings count.
            ids = tokenizer.encode_markup(request.prompt).ids
            # What the model's tokenizer puts before any text (Gemma's <bos>; nothing for SmolLM2).
            lead = tokenizer.encode("", add_special_tokens=True).ids
            if lead and ids[: len(lead)] != lead:
                ids = lead + ids
        else:
            if not model.chat:
                raise InvalidArgument(
                    "messages", f"model {model.served.name!r} has no chat template (a base model): send a prompt to complete"
                )
            messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            if not messages:
                raise InvalidArgument("messages", "at least one message is required")
            # Message contents (a customer's words, retrieved passages) stay text: no forged turns.
            ids = tokenizer.encode_chat(messages, add_generation_prompt=True).ids
        window = model.served.context_length
        if len(ids) >= window:
            raise InvalidArgument(which, f"{len(ids)} tokens; the context window is {window} tokens")
        return ids

    def _sampling(self, params: inference_pb2.SamplingParams, prompt_tokens: int, context_length: int) -> SamplingConfig:
        max_new = params.max_new_tokens or self._default_max_new_tokens
        if not 0 < max_new <= self._max_new_tokens:
            raise InvalidArgument(
                "sampling.max_new_tokens", f"{params.max_new_tokens} is out of range 1..{self._max_new_tokens}"
            )
        if not 0.0 <= params.temperature <= MAX_TEMPERATURE:
            raise InvalidArgument("sampling.temperature", f"{params.temperature} is out of range 0..{MAX_TEMPERATURE}")
        if not 0.0 <= params.top_p <= 1.0:
            raise InvalidArgument("sampling.top_p", f"{params.top_p} is out of range 0..1")
        if params.top_k < 0:
            raise InvalidArgument("sampling.top_k", f"{params.top_k} must be 0 (disabled) or positive")
        if len(params.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument("sampling.stop", f"{len(params.stop)} stop strings; the limit is {MAX_STOP_STRINGS}")
        for index, stop in enumerate(params.stop):
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise InvalidArgument(f"sampling.stop[{index}]", f"must be 1..{MAX_STOP_CHARS} characters")
        return SamplingConfig(
            # The context window caps a long prompt's budget; reaching it finishes with LENGTH.
            max_new_tokens=min(max_new, context_length - prompt_tokens),
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed or None,
            stop=tuple(params.stop),
        )

    async def generate(
        self, request: inference_pb2.GenerateRequest, tenant: str, deadline: Deadline | None
    ) -> AsyncIterator[StreamEvent]:
        """Validate and queue a request; the stream yields its tokens, then its finish."""
        async with self.generation.use(request.model) as model:
            async for event in self._generate(request, model, tenant, deadline):
                yield event

    async def _generate(
        self, request: inference_pb2.GenerateRequest, model: GenerationModel, tenant: str, deadline: Deadline | None
    ) -> AsyncIterator[StreamEvent]:
        name = model.served.name
        prompt_ids = self._prompt_ids(request, model)
        sampling = self._sampling(request.sampling, len(prompt_ids), model.served.context_length)
        operation = (GenAiOperationNameValues.CHAT if request.HasField("messages") else GenAiOperationNameValues.TEXT_COMPLETION).value
        priority = PRIORITY_NAMES[priority_rank(request.priority)]
        span = self._tracer.start_span(
            f"{operation} {name}",
            attributes={
                GEN_AI_OPERATION_NAME: operation,
                GEN_AI_PROVIDER_NAME: GEN_AI_PROVIDER,
                GEN_AI_REQUEST_MODEL: name,
                GEN_AI_REQUEST_MAX_TOKENS: sampling.max_new_tokens,
                GEN_AI_REQUEST_TEMPERATURE: sampling.temperature,
                GEN_AI_REQUEST_TOP_P: sampling.top_p,
                GEN_AI_REQUEST_TOP_K: sampling.top_k,
                GEN_AI_USAGE_INPUT_TOKENS: len(prompt_ids),
                "llmos.tenant": tenant,
                "llmos.priority": priority,
            },
        )
        try:
            async for event in model.scheduler.submit(
                GenerationRequest(prompt_ids, sampling, tenant, request.priority, deadline)
            ):
                if event.finish is not None and event.usage is not None:
                    if event.finish is not FinishReason.CANCELLED:
                        self._record_latencies(event.usage, operation, priority, name)
                    span.set_attributes({
                        GEN_AI_RESPONSE_MODEL: name,
                        GEN_AI_RESPONSE_FINISH_REASONS: [event.finish.value],
                        GEN_AI_USAGE_OUTPUT_TOKENS: event.usage.generated_tokens,
                        "llmos.inference.cached_prompt_tokens": event.usage.cached_prompt_tokens,
                        "llmos.inference.queue_ms": event.usage.queue_ms,
                        "llmos.inference.time_to_first_token_ms": event.usage.time_to_first_token_ms,
                    })
                yield event
        except LlmosError as exc:
            span.set_status(Status(StatusCode.ERROR, exc.message))
            raise
        finally:
            span.end()

    def _record_latencies(self, usage: Usage, operation: str, priority: str, model: str) -> None:
        """gen_ai.server.* of a successful response, with the attributes the conventions ask for."""
        attributes = {
            GEN_AI_OPERATION_NAME: operation,
            GEN_AI_PROVIDER_NAME: GEN_AI_PROVIDER,
            GEN_AI_REQUEST_MODEL: model,
            GEN_AI_RESPONSE_MODEL: model,
            "llmos.priority": priority,
        }
        self._time_to_first_token.record(usage.time_to_first_token_ms / 1000, attributes)
        if usage.time_per_output_token_ms > 0:
            self._time_per_output_token.record(usage.time_per_output_token_ms / 1000, attributes)

    def list_models(self) -> list[inference_pb2.ModelInfo]:
        return [*self.generation.infos(), *self.embeddings.infos()]

