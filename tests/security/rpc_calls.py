"""Calling any RPC of the test stack by its descriptor, as any caller, and one request per RPC
that a healthy service must answer (a canary), for the access matrix and the fuzzing.

A call is made with a traceparent of its own, so the audit record it caused can be found by
trace id. A call that ends by its deadline is reported as such: no answer is an answer here.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import symbol_database
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from llmos.keys import parse_static_keys
from llmos.settings import SERVICE_NAMES
from llmos.v1 import audit_pb2, common_pb2, dialogue_pb2, inference_pb2, ingest_pb2, retrieval_pb2, speech_pb2
from llmos.v1 import tokenizer_pb2
from tests.conftest import TEST_API_KEY, TEST_KEYS, RunningStack

MODULES = {"ingest": ingest_pb2, "tokenizer": tokenizer_pb2, "inference": inference_pb2, "retrieval": retrieval_pb2,
           "speech": speech_pb2, "dialogue": dialogue_pb2, "audit": audit_pb2}
PRINCIPALS = parse_static_keys(",".join(f"{key}={identity}" for key, identity in TEST_KEYS.items()))
# Each principal of the test stack with the raw key it calls with.
CALLERS = {principal.subject: next(k for k, identity in TEST_KEYS.items() if identity.startswith(principal.subject + ":"))
           for principal in PRINCIPALS.values()}
PRINCIPAL_OF = {CALLERS[principal.subject]: principal for principal in PRINCIPALS.values()}
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# What an allowed call may end with: success, or an error about the request or the data it names.
DOMAIN_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS,
}
ANSWERED = {grpc.StatusCode.OK} | DOMAIN_ERRORS
# The answers a call may get, whoever makes it: a refusal too, and RESOURCE_EXHAUSTED from a quota.
DELIBERATE = ANSWERED | DENIED | {grpc.StatusCode.RESOURCE_EXHAUSTED}
DEMO_CLIP = Path(__file__).resolve().parents[2] / "demo" / "voice" / "gift-card-question.wav"
ANSWER_VOICE = "espeak-en-us"  # instant synthesis keeps canaries short on a small machine


def all_rpcs() -> list[tuple[str, MethodDescriptor]]:
    return [(service, method) for service in SERVICE_NAMES if service in MODULES
            for descriptor in MODULES[service].DESCRIPTOR.services_by_name.values() for method in descriptor.methods]


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def request_class(method: MethodDescriptor) -> type[Message]:
    return symbol_database.Default().GetSymbol(method.input_type.full_name)  # type: ignore[no-any-return]


def new_trace_id() -> str:
    return secrets.token_hex(16)


@dataclass
class Outcome:
    status: grpc.StatusCode
    details: str
    responses: list[Any] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ended_by_deadline(self) -> bool:
        return self.status == grpc.StatusCode.DEADLINE_EXCEEDED

    def __str__(self) -> str:
        return f"{self.status.name} after {self.seconds:.1f} s ({self.details[:300]})"


# grpc/grpc#36066: when a server ends a client-streaming call before the client has sent
# everything, the asyncio client may replace the server's status with this one. Such a call is
# made again: the server's answer is what is under test.
CLIENT_RACE = (grpc.StatusCode.INTERNAL, "Internal error from Core")

Requests = Message | bytes | Sequence[Message | bytes]


class Caller:
    """One channel per service, reused by every call made through it."""

    def __init__(self, stack: RunningStack) -> None:
        self._stack = stack
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.client_races = 0  # client-streaming calls asked again (CLIENT_RACE)

    async def __aenter__(self) -> Caller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for channel in self._channels.values():
            await channel.close()

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = grpc.aio.insecure_channel(
                self._stack.addr(service),
                options=[("grpc.max_send_message_length", 64 * 1024 * 1024),
                         ("grpc.max_receive_message_length", 64 * 1024 * 1024)],
            )
        return self._channels[service]

    async def call(
        self, service: str, method: MethodDescriptor, key: str | None, requests: Requests | None = None,
        timeout_s: float = 60.0, trace_id: str = "",
    ) -> Outcome:
        """Call `method` as the holder of `key` (None: no credentials) with `requests` (one
        message, or a sequence for a client stream; bytes are sent as they are, unparsed)."""
        outcome = await self._call_once(service, method, key, requests, timeout_s, trace_id)
        if method.client_streaming and (outcome.status, outcome.details) == CLIENT_RACE:
            # The server ended the call while messages were still on their way: ask again with the
            # first message alone, which is where services refuse a call.
            self.client_races += 1
            outcome = await self._call_once(service, method, key, requests_of(requests)[:1], timeout_s, trace_id)
        return outcome

    async def _call_once(
        self, service: str, method: MethodDescriptor, key: str | None, requests: Requests | None, timeout_s: float,
        trace_id: str,
    ) -> Outcome:
        response_type = symbol_database.Default().GetSymbol(method.output_type.full_name)
        if requests is None:
            requests = request_class(method)()
        metadata: list[tuple[str, str]] = [("authorization", f"Bearer {key}")] if key else []
        if trace_id:
            metadata.append(("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"))
        kind = ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming else "unary")
        stub = getattr(self.channel(service), kind)(
            path(method), request_serializer=_serialize, response_deserializer=response_type.FromString
        )
        responses: list[Any] = []
        started = time.perf_counter()
        try:
            if method.client_streaming:
                await _stream_call(stub(metadata=metadata, timeout=timeout_s), requests_of(requests), method, responses)
            else:
                rpc = stub(requests, metadata=metadata, timeout=timeout_s)
                if method.server_streaming:
                    async for response in rpc:
                        responses.append(response)
                else:
                    responses.append(await rpc)
        except grpc.aio.AioRpcError as error:
            return Outcome(error.code(), error.details() or "", responses, time.perf_counter() - started)
        return Outcome(grpc.StatusCode.OK, "", responses, time.perf_counter() - started)


async def _stream_call(call: Any, messages: list[Message | bytes], method: MethodDescriptor, responses: list[Any]) -> None:
    """Write `messages` one by one while reading the answers; stop writing once the server has
    ended the call (it may refuse the first message), so that its status is the one reported."""

    async def read() -> None:
        if method.server_streaming:
            while (response := await call.read()) is not grpc.aio.EOF:
                responses.append(response)
        else:
            responses.append(await call)

    reader = asyncio.ensure_future(read())
    try:
        for message in messages:
            if call.done() or reader.done():
                break
            try:
                await call.write(message)
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError, grpc.aio.UsageError):
                break
        if not call.done():
            try:
                await call.done_writing()
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError, grpc.aio.UsageError):
                pass
        await reader
    finally:
        reader.cancel()
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise grpc.aio.AioRpcError(code, await call.initial_metadata(), await call.trailing_metadata(), await call.details())


def _serialize(message: Message | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


# Canaries: one request per RPC that a healthy service answers, with a check of the answer.


@dataclass
class CanaryDocument:
    """A small indexed document in a tenant, for the RPCs that read one."""

    tenant: str
    document_id: str
    word: str  # a word only this document holds


CANARY_TEXT = "The canary document says that refunds of {word} orders take five days. Nothing else."


async def seed_canary_documents(caller: Caller, tenants: Iterable[str]) -> dict[str, CanaryDocument]:
    """Index one canary document in each tenant (as the administrator) and wait until searchable."""
    submit, status = _method("ingest", "SubmitDocument"), _method("ingest", "GetDocumentStatus")
    documents: dict[str, CanaryDocument] = {}
    for tenant in tenants:
        word = f"zq{uuid.uuid4().hex[:8]}"
        document = CanaryDocument(tenant, f"canary-{word}", word)
        outcome = await caller.call("ingest", submit, TEST_API_KEY, ingest_pb2.SubmitDocumentRequest(
            tenant=tenant, document_id=document.document_id, title="Canary", mime_type="text/plain",
            content=CANARY_TEXT.format(word=word).encode()))
        assert outcome.status == grpc.StatusCode.OK, f"seeding {tenant}: {outcome}"
        documents[tenant] = document
    for document in documents.values():
        for _ in range(1200):
            outcome = await caller.call("ingest", status, TEST_API_KEY, ingest_pb2.GetDocumentStatusRequest(
                tenant=document.tenant, document_id=document.document_id))
            if outcome.status == grpc.StatusCode.OK and outcome.responses[0].stage == common_pb2.DOCUMENT_STAGE_INDEXED:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"canary document of {document.tenant} not indexed: {outcome}")
    return documents


def _method(service: str, name: str) -> MethodDescriptor:
    return next(method for s, method in all_rpcs() if s == service and method.name == name)


def clip_chunks(chunk_ms: int = 100) -> list[bytes]:
    """The demo's spoken question as 16 kHz LINEAR16 chunks, then a second of silence (the end of the turn)."""
    import numpy as np  # noqa: PLC0415 - only the speech canaries need it

    from llmos.audio import Encoding, decode_clip, samples_to_pcm  # noqa: PLC0415

    clip = decode_clip(DEMO_CLIP.read_bytes(), Encoding.WAV, 0)
    assert clip.sample_rate == 16000, clip.sample_rate
    samples = np.concatenate([clip.samples, np.zeros(16000, np.int16)])
    step = 16 * chunk_ms
    return [samples_to_pcm(samples[i:i + step]) for i in range(0, len(samples), step)]


RECOGNITION = speech_pb2.RecognitionConfig(encoding=speech_pb2.AUDIO_ENCODING_LINEAR_PCM, sample_rate_hertz=16000)


@dataclass
class Canary:
    requests: Requests
    check: Callable[[list[Any]], None]  # raises AssertionError when the answer is not the expected one


@dataclass
class CanaryState:
    """What one caller's canaries carry from one RPC to the next (a session Chat opened)."""

    document: CanaryDocument
    session_id: str = ""
    submitted_id: str = field(default_factory=lambda: f"canary-submitted-{uuid.uuid4().hex[:8]}")


def canary(method: MethodDescriptor, state: CanaryState, tenant: str = "") -> Canary:
    """The canary request of `method` for a caller whose canary document is `state.document`;
    `tenant` is written into every tenant field (empty: the caller's own)."""
    name = method.name
    doc = state.document

    def first(check: Callable[[Any], bool], what: str) -> Callable[[list[Any]], None]:
        def verify(responses: list[Any]) -> None:
            assert responses and check(responses[0]), f"{name}: {what}: {responses[:1]}"

        return verify

    def every(check: Callable[[list[Any]], bool], what: str) -> Callable[[list[Any]], None]:
        def verify(responses: list[Any]) -> None:
            assert check(responses), f"{name}: {what}: {[str(r)[:200] for r in responses[:5]]}"

        return verify

    def opened_session(responses: list[Any]) -> None:
        assert responses and responses[-1].final and responses[-1].session_id, f"Chat: no final answer: {responses[-1:]}"
        assert "".join(r.delta for r in responses).strip(), "Chat: an empty answer"
        state.session_id = responses[-1].session_id

    recognition = speech_pb2.RecognitionConfig()
    recognition.CopyFrom(RECOGNITION)
    recognition.tenant = tenant
    audio = clip_chunks() if name in {"StreamingRecognize", "Converse", "Recognize"} else []
    canaries: dict[str, Callable[[], Canary]] = {
        "SubmitDocument": lambda: Canary(
            ingest_pb2.SubmitDocumentRequest(tenant=tenant, document_id=state.submitted_id, mime_type="text/plain",
                                             content=b"A canary submitted by a test; deleted again at once."),
            first(lambda r: r.document_id == state.submitted_id, "the document id back")),
        "GetDocumentStatus": lambda: Canary(
            ingest_pb2.GetDocumentStatusRequest(tenant=tenant, document_id=doc.document_id),
            first(lambda r: r.stage == common_pb2.DOCUMENT_STAGE_INDEXED, "the canary document indexed")),
        "DeleteDocument": lambda: Canary(
            ingest_pb2.DeleteDocumentRequest(tenant=tenant, document_id=state.submitted_id),
            first(lambda r: r.document_id == state.submitted_id, "the document id back")),
        "ListDocuments": lambda: Canary(
            ingest_pb2.ListDocumentsRequest(tenant=tenant, page=common_pb2.PageRequest(page_size=500)),
            first(lambda r: any(d.document_id == doc.document_id for d in r.documents), "the canary document listed")),
        "Tokenize": lambda: Canary(tokenizer_pb2.TokenizeRequest(text="canary call"), first(lambda r: len(r.ids) >= 2, "ids")),
        "Detokenize": lambda: Canary(tokenizer_pb2.DetokenizeRequest(ids=[1, 2, 3]), first(lambda r: bool(r.text), "text")),
        "CountTokens": lambda: Canary(tokenizer_pb2.CountTokensRequest(texts=["canary", "call"]),
                                      first(lambda r: len(r.counts) == 2 and min(r.counts) > 0, "two counts")),
        "ApplyChatTemplate": lambda: Canary(
            tokenizer_pb2.ApplyChatTemplateRequest(messages=[common_pb2.ChatMessage(role="user", content="canary")],
                                                   add_generation_prompt=True),
            first(lambda r: "canary" in r.prompt, "the message in the prompt")),
        "Generate": lambda: Canary(
            inference_pb2.GenerateRequest(prompt="Say yes.", tenant=tenant,
                                          sampling=inference_pb2.SamplingParams(max_new_tokens=3)),
            every(lambda rs: bool(rs) and rs[-1].finish_reason != 0, "a finished generation")),
        "Embed": lambda: Canary(inference_pb2.EmbedRequest(texts=["canary"], tenant=tenant),
                                first(lambda r: len(r.embeddings) == 1 and len(r.embeddings[0].values) > 0, "a vector")),
        "ListModels": lambda: Canary(inference_pb2.ListModelsRequest(), first(lambda r: len(r.models) > 0, "models")),
        "Search": lambda: Canary(
            retrieval_pb2.SearchRequest(tenant=tenant, query=f"refunds of {doc.word} orders"),
            first(lambda r: any(h.chunk.document_id == doc.document_id for h in r.hits), "the canary document found")),
        "Recommend": lambda: Canary(retrieval_pb2.RecommendRequest(tenant=tenant, top_k=3), first(lambda r: True, "an answer")),
        "GetDocument": lambda: Canary(
            retrieval_pb2.GetDocumentRequest(tenant=tenant, document_id=doc.document_id),
            first(lambda r: any(doc.word in c.text for c in r.chunks), "the canary document's text")),
        "Recognize": lambda: Canary(
            speech_pb2.RecognizeRequest(config=recognition, audio=b"".join(audio)),
            first(lambda r: any(a.transcript for res in r.results for a in res.alternatives), "a transcript")),
        "StreamingRecognize": lambda: Canary(
            [speech_pb2.StreamingRecognizeRequest(streaming_config=speech_pb2.StreamingRecognitionConfig(config=recognition)),
             *(speech_pb2.StreamingRecognizeRequest(audio_content=chunk) for chunk in audio)],
            every(lambda rs: any(res.is_final and res.alternatives and res.alternatives[0].transcript
                                 for r in rs for res in r.results), "a final transcript")),
        "Synthesize": lambda: Canary(
            speech_pb2.SynthesizeSpeechRequest(text="Canary.", voice_name=ANSWER_VOICE, tenant=tenant),
            first(lambda r: len(r.audio) > 0, "audio")),
        "SynthesizeStream": lambda: Canary(
            speech_pb2.SynthesizeSpeechRequest(text="Canary. Second sentence.", voice_name=ANSWER_VOICE, tenant=tenant),
            every(lambda rs: bool(rs) and all(len(r.audio) > 0 for r in rs), "audio")),
        "ListVoices": lambda: Canary(speech_pb2.ListVoicesRequest(), first(lambda r: len(r.voices) > 0, "voices")),
        "Chat": lambda: Canary(dialogue_pb2.ChatRequest(tenant=tenant, message="Hello!"), opened_session),
        "Converse": lambda: Canary(
            [dialogue_pb2.ConverseRequest(config=dialogue_pb2.ConverseConfig(
                tenant=tenant, voice_name=ANSWER_VOICE, output_sample_rate_hz=16000,
                recognition=speech_pb2.StreamingRecognitionConfig(config=recognition))),
             *(dialogue_pb2.ConverseRequest(audio_content=chunk) for chunk in audio)],
            every(lambda rs: any(r.WhichOneof("event") == "transcript" for r in rs), "a transcript")),
        "Summarize": lambda: Canary(
            dialogue_pb2.SummarizeRequest(tenant=tenant, mode=dialogue_pb2.SUMMARY_MODE_EXTRACTIVE, text=(
                "Refunds take five days. Gift cards are valid for three years. Parcels ship within two days. "
                "Returns are free for thirty days.")),
            first(lambda r: bool(r.summary.strip()), "a summary")),
        "GetSession": lambda: Canary(dialogue_pb2.GetSessionRequest(tenant=tenant, session_id=state.session_id),
                                     first(lambda r: r.session_id == state.session_id and len(r.turns) >= 1, "the session")),
        "EndSession": lambda: Canary(dialogue_pb2.EndSessionRequest(tenant=tenant, session_id=state.session_id),
                                     first(lambda r: r.ended, "the session ended")),
        "Query": lambda: Canary(audit_pb2.QueryAuditRequest(tenant=tenant), every(lambda rs: True, "an answer")),
        "Verify": lambda: Canary(audit_pb2.VerifyAuditRequest(), first(lambda r: r.intact, "an intact chain")),
    }
    return canaries[name]()


def tenant_fields(message: Message) -> list[tuple[Message, str]]:
    """Every (message, field name) of a `tenant` field set or settable in `message`, nested too."""
    found: list[tuple[Message, str]] = []
    for descriptor in message.DESCRIPTOR.fields:
        if descriptor.name == "tenant":
            found.append((message, "tenant"))
        elif descriptor.message_type is not None and not descriptor.is_repeated and message.HasField(descriptor.name):
            found.extend(tenant_fields(getattr(message, descriptor.name)))
    return found


def requests_of(requests: Requests) -> list[Message | bytes]:
    return list(requests) if isinstance(requests, Sequence) and not isinstance(requests, bytes) else [requests]


def names_a_tenant(requests: Requests) -> bool:
    return any(isinstance(r, Message) and tenant_fields(r) for r in requests_of(requests))


def fuzz_cases() -> int:
    """LLMOS_FUZZ_CASES: fuzz cases per RPC and per bus subject (200, the CI run; 2000 for a long run)."""
    return max(1, int(os.environ.get("LLMOS_FUZZ_CASES", "200")))
