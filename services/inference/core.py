"""Inference logic shared by the gRPC API and the `llmos.chunks.created` consumer.

Embeddings go through the dynamic batcher; generation through the continuous-batching
scheduler. Validation happens here so both transports reject the same input the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
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
from llmos.errors import FailedPrecondition, InvalidArgument, LlmosError
from llmos.models.catalog import get_spec
from llmos.models.store import load_manifest
from llmos.ports import Publisher
from llmos.settings import ExecutionProvider
from llmos.telemetry import TIME_PER_OUTPUT_TOKEN_BUCKETS_S, TIME_TO_FIRST_TOKEN_BUCKETS_S
from llmos.tokenization import ModelTokenizer
from llmos.v1 import common_pb2, events_pb2, inference_pb2
from services.inference.batching import PRIORITY_NAMES, EmbedBatcher, priority_rank
from services.inference.scheduler import FinishReason, GenerationRequest, GenerationScheduler, SamplingConfig, StreamEvent, Usage

GENERATION_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_TEMPERATURE = 2.0
# gen_ai.provider.name of what this service serves: the conventions list hosted APIs only, so the
# runtime that runs the models names it.
GEN_AI_PROVIDER = "onnxruntime"

CountTokens = Callable[[Sequence[str]], list[int]]


def execution_providers(choice: ExecutionProvider) -> list[str]:
    """ONNX Runtime providers for the configured choice: CUDA when present and asked or auto."""
    available = ort.get_available_providers()
    if choice is ExecutionProvider.CUDA and CUDA not in available:
        raise FailedPrecondition(
            "LLMOS_EXECUTION_PROVIDER=cuda but this onnxruntime has no CUDA provider; "
            "install the `gpu` extra or set it to auto/cpu"
        )
    if choice is not ExecutionProvider.CPU and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


@dataclass(frozen=True)
class ServedModel:
    """What ListModels reports about one loaded model."""

    name: str
    role: inference_pb2.ModelRole.ValueType
    variant: str
    folder: Path
    execution_provider: str
    context_length: int
    dimensions: int
    threads: int

    def info(self, home: Path) -> inference_pb2.ModelInfo:
        manifest = load_manifest(home).find(self.name, self.variant)
        sha256 = next((entry.sha256 for entry in manifest.files if entry.path == "model.onnx"), "") if manifest else ""
        return inference_pb2.ModelInfo(
            name=self.name,
            role=self.role,
            variant=self.variant,
            execution_provider=self.execution_provider,
            context_length=self.context_length,
            dimensions=self.dimensions,
            intra_op_threads=self.threads,
            source_package=get_spec(self.name).source.package,
            sha256=sha256,
        )


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray
    prompt_tokens: int


@dataclass(frozen=True)
class EmbedLimits:
    max_texts: int
    max_text_chars: int


def _check_model(field: str, requested: str, served: str) -> None:
    if requested and requested != served:
        raise InvalidArgument(field, f"unknown model {requested!r}; this service serves {served!r}")


class InferenceCore:
    def __init__(
        self,
        publisher: Publisher,
        home: Path,
        embedder: EmbedBatcher,
        count_embedding_tokens: CountTokens,
        embed_limits: EmbedLimits,
        embedding: ServedModel,
        generator: GenerationScheduler,
        tokenizer: ModelTokenizer,
        generation: ServedModel,
        max_new_tokens: int,
        default_max_new_tokens: int,
    ) -> None:
        self._publisher = publisher
        self._home = home
        self._embedder = embedder
        self._count_embedding_tokens = count_embedding_tokens
        self._embed_limits = embed_limits
        self.embedding = embedding
        self._generator = generator
        self._tokenizer = tokenizer
        self.generation = generation
        self._max_new_tokens = max_new_tokens
        self._default_max_new_tokens = default_max_new_tokens
        self._tracer = trace.get_tracer("llmos.inference")
        meter = metrics.get_meter("llmos.inference")
        self._time_to_first_token = meter.create_histogram(
            GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
            unit="s",
            description="arrival of a generation request to its first token, for successful responses",
            explicit_bucket_boundaries_advisory=TIME_TO_FIRST_TOKEN_BUCKETS_S,
        )
        self._time_per_output_token = meter.create_histogram(
            GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
            unit="s",
            description="time per output token after the first, for successful responses",
            explicit_bucket_boundaries_advisory=TIME_PER_OUTPUT_TOKEN_BUCKETS_S,
        )

    # Embeddings

    async def embed(self, model: str, texts: Sequence[str], priority: int) -> EmbedResult:
        _check_model("model", model, self.embedding.name)
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
        tokens = await asyncio.to_thread(self._count_embedding_tokens, texts)
        vectors = await self._embedder.embed(texts, tokens, priority)
        return EmbedResult(vectors, sum(tokens))

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
        tokens = await asyncio.to_thread(self._count_embedding_tokens, texts)
        vectors = await self._embedder.embed(texts, tokens, created.priority, bounded=False)
        embedded = events_pb2.ChunksEmbedded(
            document_id=created.document_id,
            tenant=created.tenant,
            content_hash=created.content_hash,
            model=self.embedding.name,
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

    def _prompt_ids(self, request: inference_pb2.GenerateRequest) -> list[int]:
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidArgument("input", "set either prompt or messages")
        if which == "prompt":
            if not request.prompt.strip():
                raise InvalidArgument("prompt", "is empty")
            # A raw prompt is its caller's own, template and all: its special-token strings count.
            ids = self._tokenizer.encode_markup(request.prompt).ids
        else:
            messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            if not messages:
                raise InvalidArgument("messages", "at least one message is required")
            # Message contents (a customer's words, retrieved passages) stay text: no forged turns.
            ids = self._tokenizer.encode_chat(messages, add_generation_prompt=True).ids
        window = self.generation.context_length
        if len(ids) >= window:
            raise InvalidArgument(which, f"{len(ids)} tokens; the context window is {window} tokens")
        return ids

    def _sampling(self, params: inference_pb2.SamplingParams, prompt_tokens: int) -> SamplingConfig:
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
            max_new_tokens=min(max_new, self.generation.context_length - prompt_tokens),
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
        _check_model("model", request.model, self.generation.name)
        prompt_ids = self._prompt_ids(request)
        sampling = self._sampling(request.sampling, len(prompt_ids))
        operation = (GenAiOperationNameValues.CHAT if request.HasField("messages") else GenAiOperationNameValues.TEXT_COMPLETION).value
        priority = PRIORITY_NAMES[priority_rank(request.priority)]
        span = self._tracer.start_span(
            f"{operation} {self.generation.name}",
            attributes={
                GEN_AI_OPERATION_NAME: operation,
                GEN_AI_PROVIDER_NAME: GEN_AI_PROVIDER,
                GEN_AI_REQUEST_MODEL: self.generation.name,
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
            async for event in self._generator.submit(
                GenerationRequest(prompt_ids, sampling, tenant, request.priority, deadline)
            ):
                if event.finish is not None and event.usage is not None:
                    if event.finish is not FinishReason.CANCELLED:
                        self._record_latencies(event.usage, operation, priority)
                    span.set_attributes({
                        GEN_AI_RESPONSE_MODEL: self.generation.name,
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

    def _record_latencies(self, usage: Usage, operation: str, priority: str) -> None:
        """gen_ai.server.* of a successful response, with the attributes the conventions ask for."""
        attributes = {
            GEN_AI_OPERATION_NAME: operation,
            GEN_AI_PROVIDER_NAME: GEN_AI_PROVIDER,
            GEN_AI_REQUEST_MODEL: self.generation.name,
            GEN_AI_RESPONSE_MODEL: self.generation.name,
            "llmos.priority": priority,
        }
        self._time_to_first_token.record(usage.time_to_first_token_ms / 1000, attributes)
        if usage.time_per_output_token_ms > 0:
            self._time_per_output_token.record(usage.time_per_output_token_ms / 1000, attributes)

    def list_models(self) -> list[inference_pb2.ModelInfo]:
        return [self.generation.info(self._home), self.embedding.info(self._home)]

