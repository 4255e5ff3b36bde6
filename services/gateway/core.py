"""The gateway's logic, apart from HTTP: OpenAI-shaped requests become calls of the typed
clients (`llmos.clients`) and their answers OpenAI-shaped responses; the platform's REST routes
become the services' calls. Calls carry the caller's credentials (the HTTP adapter runs each
request under `llmos.auth.acting_as`), so each service authorizes and audits the real caller.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from llmos import errors
from llmos.auth import current_principal
from llmos.clients import (
    AuditClient,
    DialogueClient,
    InferenceClient,
    IngestClient,
    RetrievalClient,
    SpeechClient,
    chat_messages,
    transcript,
)
from llmos.v1 import common_pb2, dialogue_pb2, inference_pb2, ingest_pb2, retrieval_pb2, speech_pb2
from services.gateway.audio import RECOGNITION_RATE, decode_upload, pcm_bytes
from services.gateway.errors import ModelNotFound
from services.gateway.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DocumentRequest,
    EmbeddingRequest,
    RecommendRequest,
    SpeechRequest,
    SummarizeRequest,
)

Json = dict[str, Any]
# Transcription model ids and the speech service's recognition model each names.
TRANSCRIPTION_MODELS = {"pocketsphinx": "general", "pocketsphinx-domain": "domain"}
# OpenAI's `pcm` is 24 kHz 16-bit little-endian mono.
PCM_RATE = 24_000
SPEECH_FORMATS = {"wav": ("audio/wav", speech_pb2.AUDIO_ENCODING_WAV), "pcm": ("audio/pcm", speech_pb2.AUDIO_ENCODING_LINEAR_PCM)}
_FINISH = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_CANCELLED: "stop",
}
_ROLES = {"developer": "system", "system": "system", "user": "user", "assistant": "assistant"}
MAX_EMBEDDING_INPUTS = 2048


def message_dict(message: Message) -> Json:
    """A protobuf message as JSON with the proto's field names and every scalar present."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


@dataclass
class ServedModels:
    generation: dict[str, inference_pb2.ModelInfo]
    embedding: dict[str, inference_pb2.ModelInfo]
    voices: list[speech_pb2.Voice]
    fetched_at: float


@dataclass(frozen=True)
class Clients:
    inference: InferenceClient
    dialogue: DialogueClient
    speech: SpeechClient
    retrieval: RetrievalClient
    ingest: IngestClient
    audit: AuditClient


@dataclass(frozen=True)
class Audio:
    content: bytes
    media_type: str


def _text_of(message: ChatMessage, position: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise errors.InvalidArgument(f"messages[{position}].content", f"part of type {part.type!r} is not supported; send text parts")
        texts.append(part.text)
    return "".join(texts)


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _sampling(request: ChatCompletionRequest | CompletionRequest, max_tokens: int | None) -> inference_pb2.SamplingParams:
    if request.n != 1:
        raise errors.InvalidArgument("n", "only one choice per request is generated; send n=1")
    if request.logprobs:
        raise errors.InvalidArgument("logprobs", "log probabilities are not returned by this server")
    return inference_pb2.SamplingParams(
        max_new_tokens=max_tokens or 0,
        temperature=request.temperature or 0.0,
        top_p=request.top_p or 0.0,
        seed=request.seed or 0,
        stop=_stops(request.stop),
    )


class GatewayCore:
    def __init__(self, clients: Clients, assistant_model: str, timeout_s: float, models_ttl_s: float, max_audio_s: float) -> None:
        self._clients = clients
        self.assistant_model = assistant_model
        self._timeout_s = timeout_s
        self._models_ttl_s = models_ttl_s
        self._max_audio_s = max_audio_s
        self._served: ServedModels | None = None

    # -- models ---------------------------------------------------------------------------

    async def served(self) -> ServedModels:
        """What inference and speech serve, asked again after the TTL (models change only on restart)."""
        if self._served is None or time.monotonic() - self._served.fetched_at > self._models_ttl_s:
            infos = await self._clients.inference.models(timeout_s=self._timeout_s)
            try:
                voices = await self._clients.speech.voices(timeout_s=self._timeout_s)
            except (errors.PermissionDenied, errors.Unavailable):
                voices = []  # a caller without speech, or speech down: the text models still list
            self._served = ServedModels(
                {info.name: info for info in infos if info.role == inference_pb2.MODEL_ROLE_GENERATION},
                {info.name: info for info in infos if info.role == inference_pb2.MODEL_ROLE_EMBEDDING},
                voices,
                time.monotonic(),
            )
        return self._served

    async def models(self) -> Json:
        served = await self.served()
        data = [
            _model(name, "generation", context_length=info.context_length, execution_provider=info.execution_provider)
            for name, info in served.generation.items()
        ]
        data += [
            _model(name, "embedding", dimensions=info.dimensions, execution_provider=info.execution_provider)
            for name, info in served.embedding.items()
        ]
        data.append(_model(self.assistant_model, "assistant"))
        data += [_model(name, "transcription") for name in TRANSCRIPTION_MODELS]
        engines = sorted({voice.engine for voice in served.voices})
        data += [_model(engine, "speech", voices=[v.name for v in served.voices if v.engine == engine]) for engine in engines]
        return {"object": "list", "data": data}

    async def _model(self, name: str, kinds: Callable[[ServedModels], dict[str, inference_pb2.ModelInfo]], role: str) -> str:
        served = await self.served()
        if name not in kinds(served):
            accepted = sorted(kinds(served)) + ([self.assistant_model] if role == "chat" else [])
            raise ModelNotFound(f"model {name!r} does not exist or is not a {role} model; served: {', '.join(accepted)}")
        return name

    # -- chat and completions -------------------------------------------------------------

    async def chat_completion_chunks(self, request: ChatCompletionRequest, session_id: str | None) -> AsyncIterator[Json]:
        """The answer as `chat.completion.chunk` objects; the first is produced only once the
        service has answered, so a refusal (a full queue, a bad request) surfaces before any."""
        if request.model == self.assistant_model:
            async for chunk in self._assistant_chunks(request, session_id):
                yield chunk
            return
        model = await self._model(request.model, lambda served: served.generation, "chat")
        messages = []
        for position, message in enumerate(request.messages):
            if message.role not in _ROLES:
                raise errors.InvalidArgument(f"messages[{position}].role", f"{message.role!r} messages are not supported")
            messages.append((_ROLES[message.role], _text_of(message, position)))
        generate = inference_pb2.GenerateRequest(
            model=model,
            messages=chat_messages(messages),
            sampling=_sampling(request, request.max_completion_tokens or request.max_tokens),
            priority=common_pb2.PRIORITY_INTERACTIVE,
        )
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        chunk = _ChunkMaker("chatcmpl", "chat.completion.chunk", model)
        first = True
        async for response in self._clients.inference.generate(generate, timeout_s=self._timeout_s):
            if first:
                yield chunk.choice({"role": "assistant", "content": ""})
                first = False
            if response.delta:
                yield chunk.choice({"content": response.delta})
            if response.finish_reason:
                yield chunk.choice({}, finish_reason=_FINISH.get(response.finish_reason, "stop"))
                if include_usage:
                    yield chunk.usage(_usage(response.usage.prompt_tokens, response.usage.generated_tokens))

    async def _assistant_chunks(self, request: ChatCompletionRequest, session_id: str | None) -> AsyncIterator[Json]:
        """A turn of the assistant: the last user message goes to DialogueService.Chat (the session
        keeps the history, so earlier messages of the request are not sent again)."""
        position, message = next(
            ((position, message) for position, message in reversed(list(enumerate(request.messages))) if message.role == "user"),
            (None, None),
        )
        if message is None or position is None:
            raise errors.InvalidArgument("messages", "the assistant answers the last 'user' message; there is none")
        chat = dialogue_pb2.ChatRequest(session_id=session_id or "", message=_text_of(message, position), user_id=request.user or "")
        chunk = _ChunkMaker("chatcmpl", "chat.completion.chunk", self.assistant_model)
        first = True
        async for response in self._clients.dialogue.chat(chat, self._timeout_s):
            if first:
                chunk.extra["session_id"] = response.session_id
                yield chunk.choice({"role": "assistant", "content": ""}, intent=message_dict(response.intent) if response.HasField("intent") else None)
                first = False
            if response.delta:
                yield chunk.choice({"content": response.delta}, citation=message_dict(response.citation) if response.HasField("citation") else None)
            if response.final:
                yield chunk.choice(
                    {},
                    finish_reason="stop",
                    citations=[message_dict(citation) for citation in response.citations],
                    handoff=response.handoff,
                    grounding=message_dict(response.grounding) if response.HasField("grounding") else None,
                )

    async def completion_chunks(self, request: CompletionRequest) -> AsyncIterator[Json]:
        model = await self._model(request.model, lambda served: served.generation, "completion")
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1:
            raise errors.InvalidArgument("prompt", "send one prompt per request")
        if request.echo:
            raise errors.InvalidArgument("echo", "echoing the prompt is not supported")
        generate = inference_pb2.GenerateRequest(
            model=model, prompt=prompts[0], sampling=_sampling(request, request.max_tokens), priority=common_pb2.PRIORITY_INTERACTIVE
        )
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        chunk = _ChunkMaker("cmpl", "text_completion", model)
        async for response in self._clients.inference.generate(generate, timeout_s=self._timeout_s):
            if response.delta or response.finish_reason:
                yield chunk.text(response.delta, _FINISH.get(response.finish_reason) if response.finish_reason else None)
            if response.finish_reason and include_usage:
                yield chunk.usage(_usage(response.usage.prompt_tokens, response.usage.generated_tokens))

    # -- embeddings -----------------------------------------------------------------------

    async def embeddings(self, request: EmbeddingRequest) -> Json:
        model = await self._model(request.model, lambda served: served.embedding, "embedding")
        texts = [request.input] if isinstance(request.input, str) else request.input
        if not texts or not all(isinstance(text, str) for text in texts):
            raise errors.InvalidArgument("input", "send a string or a list of strings (token arrays are not accepted)")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise errors.InvalidArgument("input", f"{len(texts)} inputs is over the limit of {MAX_EMBEDDING_INPUTS}")
        for position, text in enumerate(texts):
            if not text:
                raise errors.InvalidArgument(f"input[{position}]", "is empty")
        dimensions = (await self.served()).embedding[model].dimensions
        if request.dimensions is not None and request.dimensions != dimensions:
            raise errors.InvalidArgument("dimensions", f"{model} makes {dimensions}-dimensional embeddings only")
        response = await self._clients.inference.embed_response(
            [str(text) for text in texts], model=model, timeout_s=self._timeout_s
        )
        data = []
        for index, embedding in enumerate(response.embeddings):
            if request.encoding_format == "base64":
                vector: Any = base64.b64encode(np.asarray(embedding.values, dtype="<f4").tobytes()).decode()
            else:
                vector = list(embedding.values)
            data.append({"object": "embedding", "index": index, "embedding": vector})
        return {"object": "list", "data": data, "model": response.model or model,
                "usage": {"prompt_tokens": response.prompt_tokens, "total_tokens": response.prompt_tokens}}

    # -- audio ----------------------------------------------------------------------------

    async def transcription(self, data: bytes, model: str, language: str | None, response_format: str, words: bool) -> Json | str:
        if model not in TRANSCRIPTION_MODELS:
            raise ModelNotFound(f"model {model!r} is not a transcription model; served: {', '.join(TRANSCRIPTION_MODELS)}")
        if response_format not in ("json", "text", "verbose_json"):
            raise errors.InvalidArgument("response_format", f"{response_format!r} is not supported; use json, text or verbose_json")
        clip = decode_upload(data, self._max_audio_s)
        language_code = "en-US" if language in (None, "", "en") else language
        config = speech_pb2.RecognitionConfig(
            encoding=speech_pb2.AUDIO_ENCODING_LINEAR_PCM,
            sample_rate_hertz=RECOGNITION_RATE,
            language_code=language_code,
            model=TRANSCRIPTION_MODELS[model],
            enable_word_time_offsets=words,
        )
        results = await self._clients.speech.recognize(config, pcm_bytes(clip.samples), timeout_s=self._timeout_s)
        text = transcript(results)
        if response_format == "text":
            return text
        if response_format == "json":
            return {"text": text}
        best = [result.alternatives[0] for result in results if result.alternatives]
        verbose: Json = {"task": "transcribe", "language": language or "en", "duration": clip.duration_ms / 1000, "text": text,
                         "segments": [{"id": index, "text": alternative.transcript, "confidence": alternative.confidence}
                                      for index, alternative in enumerate(best)]}
        if words:
            verbose["words"] = [{"word": word.word, "start": word.start_ms / 1000, "end": word.end_ms / 1000}
                                for alternative in best for word in alternative.words]
        return verbose

    async def speech(self, request: SpeechRequest) -> Audio:
        if request.response_format not in SPEECH_FORMATS:
            raise errors.InvalidArgument("response_format", f"{request.response_format!r} is not supported; use wav or pcm")
        voices = {voice.name: voice for voice in (await self.served()).voices}
        engines = sorted({voice.engine for voice in voices.values()})
        if request.model not in engines:
            raise ModelNotFound(f"model {request.model!r} is not a speech model; served: {', '.join(engines) or 'none'}")
        voice = voices.get(request.voice)
        if voice is None or voice.engine != request.model:
            names = [name for name, known in voices.items() if known.engine == request.model]
            raise errors.InvalidArgument("voice", f"{request.voice!r} is not a voice of {request.model}; voices: {', '.join(names)}")
        media_type, encoding = SPEECH_FORMATS[request.response_format]
        synthesis = speech_pb2.SynthesizeSpeechRequest(
            text=request.input, voice_name=voice.name, encoding=encoding,
            sample_rate_hz=PCM_RATE if request.response_format == "pcm" else 0, speed=request.speed,
        )
        response = await self._clients.speech.synthesize(synthesis, timeout_s=self._timeout_s)
        return Audio(response.audio, media_type)

    # -- documents, search, summaries, sessions, recommendations, audit ---------------------

    async def submit_document(self, document: DocumentRequest, content: bytes) -> Json:
        request = ingest_pb2.SubmitDocumentRequest(
            document_id=document.document_id, title=document.title, mime_type=document.mime_type, content=content,
            source=document.source, tags=document.tags, metadata=document.metadata,
            priority=common_pb2.PRIORITY_INTERACTIVE if document.interactive else common_pb2.PRIORITY_BATCH,
        )
        response = await self._clients.ingest.submit(request, timeout_s=self._timeout_s)
        return {"id": response.document_id, "object": "document", "content_hash": response.content_hash,
                "status": _stage(response.stage), "unchanged": response.unchanged}

    async def list_documents(self, limit: int, after: str, status: str | None, include_deleted: bool) -> Json:
        stage = _stage_named(status) if status else common_pb2.DOCUMENT_STAGE_UNSPECIFIED
        page = await self._clients.ingest.documents_page(
            page_size=limit, page_token=after, stage=stage, include_deleted=include_deleted, timeout_s=self._timeout_s
        )
        next_token = page.page.next_page_token
        return {"object": "list", "data": [_document(status) for status in page.documents], "has_more": bool(next_token),
                "next_page_token": next_token or None}

    async def document(self, document_id: str, include_content: bool) -> Json:
        status = await self._clients.ingest.status(document_id, timeout_s=self._timeout_s)
        result = _document(status)
        if include_content and status.stage == common_pb2.DOCUMENT_STAGE_INDEXED:
            indexed = await self._clients.retrieval.read_document("", document_id, timeout_s=self._timeout_s)
            result.update(title=indexed.title, source=indexed.source, tags=indexed.tags, content=indexed.text)
        return result

    async def delete_document(self, document_id: str) -> Json:
        deleted = await self._clients.ingest.delete(document_id, timeout_s=self._timeout_s)
        return {"id": document_id, "object": "document", "deleted": deleted}

    async def search(self, query: str, top_k: int, mode: str, document_ids: Sequence[str], tags: Sequence[str],
                     sources: Sequence[str], user_id: str) -> Json:
        modes = {"hybrid": retrieval_pb2.SEARCH_MODE_HYBRID, "dense": retrieval_pb2.SEARCH_MODE_DENSE,
                 "sparse": retrieval_pb2.SEARCH_MODE_SPARSE}
        if mode not in modes:
            raise errors.InvalidArgument("mode", f"{mode!r} is not a search mode; use {', '.join(modes)}")
        hits = await self._clients.retrieval.search(
            "", query, top_k, self._timeout_s, mode=modes[mode],
            search_filter=retrieval_pb2.SearchFilter(document_ids=document_ids, tags=tags, sources=sources), user_id=user_id,
        )
        return {"object": "list", "data": [
            {"document_id": hit.chunk.document_id, "title": hit.chunk.title, "chunk_id": hit.chunk.chunk_id,
             "text": hit.chunk.text, "start_offset": hit.chunk.start_offset, "end_offset": hit.chunk.end_offset,
             "score": hit.score, "source": hit.chunk.source, "tags": list(hit.chunk.tags)} for hit in hits]}

    async def summarize(self, request: SummarizeRequest) -> Json:
        if (request.text is None) == (request.document_id is None):
            raise errors.InvalidArgument("text", "give exactly one of text and document_id")
        mode = dialogue_pb2.SUMMARY_MODE_ABSTRACTIVE if request.mode == "abstractive" else dialogue_pb2.SUMMARY_MODE_EXTRACTIVE
        summarize = dialogue_pb2.SummarizeRequest(mode=mode, target_words=request.target_words)
        if request.text is not None:
            summarize.text = request.text
        else:
            summarize.document_id = request.document_id or ""
        return {"object": "summary", **message_dict(await self._clients.dialogue.summarize(summarize, timeout_s=self._timeout_s))}

    async def session(self, session_id: str) -> Json:
        return {"object": "session", **message_dict(await self._clients.dialogue.session(session_id, timeout_s=self._timeout_s))}

    async def end_session(self, session_id: str) -> Json:
        ended = await self._clients.dialogue.end_session(session_id, timeout_s=self._timeout_s)
        return {"id": session_id, "object": "session", "deleted": ended}

    async def recommend(self, request: RecommendRequest) -> Json:
        recommendations = await self._clients.retrieval.recommend(
            request.user_id, top_k=request.top_k, include_seen=request.include_seen, timeout_s=self._timeout_s
        )
        return {"object": "list", "data": [message_dict(recommendation) for recommendation in recommendations]}

    async def audit_records(self, principal: str, action: str, after: int, limit: int, tenant: str) -> Json:
        records = [
            message_dict(record)
            async for record in self._clients.audit.query(
                tenant=tenant, principal=principal, action=action, after_sequence=after, limit=limit, timeout_s=self._timeout_s
            )
        ]
        return {"object": "list", "data": records, "has_more": len(records) == limit,
                "last_sequence": int(records[-1]["sequence"]) if records else after}

    async def verify_audit(self) -> Json:
        return {"object": "audit.verification", **message_dict(await self._clients.audit.verify(timeout_s=self._timeout_s))}

    @staticmethod
    def caller() -> Json:
        principal = current_principal()
        return {"subject": principal.subject, "tenant": principal.tenant, "roles": sorted(principal.roles)}


def _model(name: str, role: str, **details: Any) -> Json:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llmos", "llmos": {"role": role, **details}}


def _usage(prompt_tokens: int, completion_tokens: int) -> Json:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _stage(stage: common_pb2.DocumentStage.ValueType) -> str:
    return common_pb2.DocumentStage.Name(stage).removeprefix("DOCUMENT_STAGE_").lower()


def _stage_named(name: str) -> common_pb2.DocumentStage.ValueType:
    try:
        return common_pb2.DocumentStage.Value(f"DOCUMENT_STAGE_{name.upper()}")
    except ValueError:
        stages = [_stage(value) for value in common_pb2.DocumentStage.values() if value]
        raise errors.InvalidArgument("status", f"{name!r} is not a status; use one of {', '.join(stages)}") from None


def _document(status: ingest_pb2.DocumentStatus) -> Json:
    return {"id": status.document_id, "object": "document", "status": _stage(status.stage), "reason": status.reason or None,
            "chunk_count": status.chunk_count, "content_hash": status.content_hash,
            "updated_at": status.updated_at.seconds if status.HasField("updated_at") else None}


class _ChunkMaker:
    """The objects of one streamed answer: one id and creation time, the model's name."""

    def __init__(self, prefix: str, kind: str, model: str) -> None:
        self.base: Json = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}
        self.extra: Json = {}

    def choice(self, delta: Json, finish_reason: str | None = None, **extra: Any) -> Json:
        fields = {key: value for key, value in extra.items() if value is not None}
        return {**self.base, **self.extra, **fields,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    def text(self, text: str, finish_reason: str | None) -> Json:
        return {**self.base, "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}

    def usage(self, usage: Json) -> Json:
        return {**self.base, "choices": [], "usage": usage}


def gather_chat(chunks: Sequence[Json]) -> Json:
    """The non-streamed `chat.completion` from its chunks: one message, the extra fields kept."""
    content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    finish = next((chunk["choices"][0]["finish_reason"] for chunk in reversed(chunks) if chunk["choices"]), None)
    usage = next((chunk["usage"] for chunk in chunks if "usage" in chunk), None)
    extra: Json = {}
    for chunk in chunks:
        extra.update({key: value for key, value in chunk.items() if key not in ("id", "object", "created", "model", "choices", "usage", "citation")})
    first = chunks[0]
    return {"id": first["id"], "object": "chat.completion", "created": first["created"], "model": first["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                         "finish_reason": finish, "logprobs": None}],
            "usage": usage, **extra}


def gather_completion(chunks: Sequence[Json]) -> Json:
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"])
    finish = next((chunk["choices"][0]["finish_reason"] for chunk in reversed(chunks) if chunk["choices"]), None)
    usage = next((chunk["usage"] for chunk in chunks if "usage" in chunk), None)
    first = chunks[0]
    return {"id": first["id"], "object": "text_completion", "created": first["created"], "model": first["model"],
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": usage}
