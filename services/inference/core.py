"""Inference logic shared by the gRPC API and the `llmos.chunks.created` consumer.

Embeddings go through the dynamic batcher; generation through the continuous-batching
scheduler of the model a request names (GenerationModels: several models, loaded on first use
within a memory budget, the least recently used idle one unloaded to make room). Validation
happens here so both transports reject the same input the same way.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

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
from llmos.errors import FailedPrecondition, InvalidArgument, LlmosError, ResourceExhausted
from llmos.models.manifest import read_artefact_manifest
from llmos.ports import Publisher
from llmos.telemetry import TIME_PER_OUTPUT_TOKEN_BUCKETS_S, TIME_TO_FIRST_TOKEN_BUCKETS_S, seconds_histogram
from llmos.tokenization import ModelTokenizer
from llmos.v1 import common_pb2, events_pb2, inference_pb2
from services.inference.batching import PRIORITY_NAMES, EmbedBatcher, priority_rank
from services.inference.devices import CPU  # noqa: F401 (imported from here by the tests)
from services.inference.scheduler import FinishReason, GenerationRequest, GenerationScheduler, SamplingConfig, StreamEvent, Usage

GENERATION_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_TEMPERATURE = 2.0
# When every loaded model is busy and another must load, about one short generation's time.
BUSY_MODEL_RETRY_S = 2.0
# gen_ai.provider.name of what this service serves: the conventions list hosted APIs only, so the
# runtime that runs the models names it.
GEN_AI_PROVIDER = "onnxruntime"

CountTokens = Callable[[Sequence[str]], list[int]]


@dataclass(frozen=True)
class ServedModel:
    """What ListModels reports about one model (its provider and threads once loaded)."""

    name: str
    role: inference_pb2.ModelRole.ValueType
    variant: str
    folder: Path
    execution_provider: str
    context_length: int
    dimensions: int
    threads: int
    source: str  # the package of a catalog model, gguf:/hf:<path> of an added one

    def info(self, state: inference_pb2.ModelState.ValueType = inference_pb2.MODEL_STATE_LOADED) -> inference_pb2.ModelInfo:
        try:
            files = read_artefact_manifest(self.folder).files
        except (OSError, ValueError):  # unreadable now: the model was loaded, or listed, from it before
            files = ()
        sha256 = next((entry.sha256 for entry in files if entry.path == "model.onnx"), "")
        return inference_pb2.ModelInfo(
            name=self.name,
            role=self.role,
            variant=self.variant,
            execution_provider=self.execution_provider,
            context_length=self.context_length,
            dimensions=self.dimensions,
            intra_op_threads=self.threads,
            source_package=self.source,
            sha256=sha256,
            state=state,
        )


@dataclass(frozen=True)
class GenerationModel:
    """A generation model in memory: its scheduler (and decoder), tokenizer and footprint."""

    served: ServedModel
    scheduler: GenerationScheduler
    tokenizer: ModelTokenizer
    chat: bool  # has a chat template; a base model answers plain prompts only
    nbytes: int


@dataclass(frozen=True)
class GenerationCandidate:
    """A built generation model the service may load: what ListModels says before it is loaded."""

    served: ServedModel
    nbytes: int  # estimated memory once loaded: weights, KV cache, logits


class GenerationModels:
    """Generation models by name, loaded on first use within `budget_bytes`.

    When a model does not fit beside the loaded ones, the least recently used model that no
    stream is using is unloaded (its scheduler stopped, its decoder freed); when every loaded
    model is in use, the request is refused with RESOURCE_EXHAUSTED rather than waiting.
    `default` is loaded at start and serves requests that name no model.
    """

    def __init__(
        self,
        default: str,
        candidates: Callable[[], dict[str, GenerationCandidate]],
        load: Callable[[GenerationCandidate], GenerationModel],
        budget_bytes: int,
    ) -> None:
        self.default = default
        self._candidates = candidates
        self._load = load
        self._budget_bytes = budget_bytes
        self._loaded: OrderedDict[str, GenerationModel] = OrderedDict()  # least recently used first
        self._in_use: Counter[str] = Counter()
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> dict[str, GenerationModel]:
        return dict(self._loaded)

    def _candidate(self, name: str) -> GenerationCandidate:
        candidates = self._candidates()
        if name not in candidates:
            raise InvalidArgument("model", f"unknown model {name!r}; generation models: {', '.join(sorted(candidates))}")
        return candidates[name]

    async def load(self, name: str) -> GenerationModel:
        """`name` in memory (loading it, and unloading others to make room, if need be)."""
        async with self._lock:
            model = self._loaded.get(name)
            if model is None:
                candidate = self._candidate(name)
                if candidate.nbytes > self._budget_bytes:
                    raise FailedPrecondition(
                        f"model {name!r} needs about {candidate.nbytes >> 20} MiB, more than the whole generation "
                        f"memory budget of {self._budget_bytes >> 20} MiB (LLMOS_INFERENCE_GENERATION_MEMORY_MB)"
                    )
                await self._make_room(name, candidate.nbytes)
                model = await asyncio.to_thread(self._load, candidate)
                model.scheduler.start()
                self._loaded[name] = model
            self._loaded.move_to_end(name)
            return model

    async def _make_room(self, name: str, nbytes: int) -> None:
        while sum(model.nbytes for model in self._loaded.values()) + nbytes > self._budget_bytes:
            idle = next((loaded for loaded in self._loaded if not self._in_use[loaded]), None)
            if idle is None:
                raise ResourceExhausted(
                    f"model {name!r} does not fit in the generation memory budget while "
                    f"{', '.join(self._loaded)} serve other requests",
                    BUSY_MODEL_RETRY_S,
                )
            await self._loaded.pop(idle).scheduler.stop()

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[GenerationModel]:
        """The model named (empty: the default), kept loaded while the caller holds it."""
        name = name or self.default
        model = await self.load(name)
        self._in_use[name] += 1
        try:
            yield model
        finally:
            self._in_use[name] -= 1

    def infos(self) -> list[inference_pb2.ModelInfo]:
        loaded = [model.served.info(inference_pb2.MODEL_STATE_LOADED) for model in self._loaded.values()]
        available = [
            candidate.served.info(inference_pb2.MODEL_STATE_AVAILABLE)
            for name, candidate in sorted(self._candidates().items())
            if name not in self._loaded
        ]
        return loaded + available

    async def close(self) -> None:
        async with self._lock:
            while self._loaded:
                await self._loaded.popitem()[1].scheduler.stop()


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
        embedder: EmbedBatcher,
        count_embedding_tokens: CountTokens,
        embed_limits: EmbedLimits,
        embedding: ServedModel,
        generation: GenerationModels,
        max_new_tokens: int,
        default_max_new_tokens: int,
    ) -> None:
        self._publisher = publisher
        self._embedder = embedder
        self._count_embedding_tokens = count_embedding_tokens
        self._embed_limits = embed_limits
        self.embedding = embedding
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
        return [*self.generation.infos(), self.embedding.info()]

