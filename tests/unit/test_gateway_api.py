"""The gateway's HTTP API as the official `openai` client and plain HTTP see it, over fake
service clients: response shapes, streaming, extra fields, each error status, the caller's
credentials forwarded, audit records, audio decoding."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import soundfile
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from llmos import errors
from llmos.auth import current_principal
from llmos.audit import ALLOW, DENY
from llmos.keys import KeyAuthenticator, parse_static_keys
from llmos.telemetry import inject_context
from llmos.testing import MemoryPublisher
from llmos.v1 import common_pb2, dialogue_pb2, inference_pb2, ingest_pb2, speech_pb2
from services.gateway.auditing import GatewayAudit
from services.gateway.core import Clients, GatewayCore
from services.gateway.http import SESSION_HEADER, create_app
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit

KEYS = "user-key=alice:acme:user,admin-key=root:acme:admin"
SETTINGS = GatewaySettings(
    _env_file=None, nats_url="nats://127.0.0.1:1", ingest_addr="h:1", tokenizer_addr="h:2", inference_addr="h:3",  # type: ignore[call-arg]
    retrieval_addr="h:4", speech_addr="h:5", dialogue_addr="h:6", audit_addr="h:7", gateway_max_json_bytes=64 * 1024,
)


class FakeInference:
    def __init__(self) -> None:
        self.failure: errors.LlmosError | None = None
        self.fail_after_first = False
        self.requests: list[inference_pb2.GenerateRequest] = []
        self.callers: list[str] = []
        self.traces: list[str] = []

    async def models(self, *, timeout_s: float | None = None) -> list[inference_pb2.ModelInfo]:
        return [
            inference_pb2.ModelInfo(name="smollm2", role=inference_pb2.MODEL_ROLE_GENERATION, context_length=2048),
            inference_pb2.ModelInfo(name="minilm", role=inference_pb2.MODEL_ROLE_EMBEDDING, dimensions=3),
        ]

    async def generate(self, request: inference_pb2.GenerateRequest, *, timeout_s: float | None = None) -> AsyncIterator[inference_pb2.GenerateResponse]:
        self.requests.append(request)
        self.callers.append(current_principal().subject)
        self.traces.append(inject_context({}).get("traceparent", ""))
        if self.failure and not self.fail_after_first:
            raise self.failure
        yield inference_pb2.GenerateResponse(delta="Hel")
        if self.failure:
            raise self.failure
        yield inference_pb2.GenerateResponse(delta="lo")
        yield inference_pb2.GenerateResponse(
            finish_reason=inference_pb2.FINISH_REASON_LENGTH, usage=inference_pb2.GenerationUsage(prompt_tokens=7, generated_tokens=2)
        )

    async def embed_response(self, texts: list[str], *, model: str = "", timeout_s: float | None = None, **_: Any) -> inference_pb2.EmbedResponse:
        vectors = [inference_pb2.Embedding(values=[len(text) / 10, 0.5, -0.25]) for text in texts]
        return inference_pb2.EmbedResponse(model=model, dimensions=3, embeddings=vectors, prompt_tokens=4 * len(texts))


class FakeDialogue:
    def __init__(self) -> None:
        self.requests: list[dialogue_pb2.ChatRequest] = []

    async def chat(self, request: dialogue_pb2.ChatRequest, timeout_s: float | None) -> AsyncIterator[dialogue_pb2.ChatResponse]:
        self.requests.append(request)
        session = request.session_id or "s-new"
        yield dialogue_pb2.ChatResponse(session_id=session, intent=dialogue_pb2.Intent(name="returns", confidence=0.9))
        citation = dialogue_pb2.Citation(document_id="returns", title="Returns", chunk_id="c1", score=0.8)
        yield dialogue_pb2.ChatResponse(session_id=session, delta="Returns are free.", citation=citation)
        yield dialogue_pb2.ChatResponse(session_id=session, final=True, citations=[citation])


class FakeSpeech:
    def __init__(self) -> None:
        self.recognized: list[tuple[speech_pb2.RecognitionConfig, bytes]] = []
        self.synthesized: list[speech_pb2.SynthesizeSpeechRequest] = []

    async def voices(self, *, timeout_s: float | None = None) -> list[speech_pb2.Voice]:
        return [speech_pb2.Voice(name="af_heart", engine="kokoro", sample_rate_hz=24000)]

    async def recognize(self, config: speech_pb2.RecognitionConfig, audio: bytes, *, timeout_s: float | None = None) -> list[speech_pb2.SpeechRecognitionResult]:
        self.recognized.append((config, audio))
        return [speech_pb2.SpeechRecognitionResult(alternatives=[speech_pb2.SpeechRecognitionAlternative(transcript="hello world")], is_final=True)]

    async def synthesize(self, request: speech_pb2.SynthesizeSpeechRequest, *, timeout_s: float | None = None) -> speech_pb2.SynthesizeSpeechResponse:
        self.synthesized.append(request)
        return speech_pb2.SynthesizeSpeechResponse(audio=b"RIFF-fake", encoding=request.encoding)


class FakeIngest:
    async def documents_page(self, **request: Any) -> ingest_pb2.ListDocumentsResponse:
        documents = [ingest_pb2.DocumentStatus(document_id="faq", tenant="acme", stage=common_pb2.DOCUMENT_STAGE_INDEXED, chunk_count=3)]
        return ingest_pb2.ListDocumentsResponse(documents=documents, page=common_pb2.PageResponse(next_page_token="faq"))

    async def status(self, document_id: str, *, timeout_s: float | None = None) -> ingest_pb2.DocumentStatus:
        return ingest_pb2.DocumentStatus(document_id=document_id, tenant="acme", stage=common_pb2.DOCUMENT_STAGE_CHUNKED)

    async def submit(self, request: ingest_pb2.SubmitDocumentRequest, *, timeout_s: float | None = None) -> ingest_pb2.SubmitDocumentResponse:
        return ingest_pb2.SubmitDocumentResponse(document_id=request.document_id or "generated", content_hash="h", stage=common_pb2.DOCUMENT_STAGE_CHUNKED)


class Gateway:
    def __init__(self, audit: MemoryPublisher | None = None) -> None:
        self.spans = InMemorySpanExporter()
        tracing = SdkTracerProvider()
        tracing.add_span_processor(SimpleSpanProcessor(self.spans))
        self.inference = FakeInference()
        self.dialogue = FakeDialogue()
        self.speech = FakeSpeech()
        self.audit = audit or MemoryPublisher()
        clients = Clients(self.inference, self.dialogue, self.speech, None, FakeIngest(), None)  # type: ignore[arg-type]
        core = GatewayCore(clients, "llmos-assistant", timeout_s=5, models_ttl_s=30, max_audio_s=60)
        self.app = create_app(SETTINGS, core, KeyAuthenticator(parse_static_keys(KEYS)), GatewayAudit(self.audit), tracing)

    def http(self, key: str | None = "user-key") -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://gateway", headers=headers)

    def openai(self, key: str = "user-key") -> openai.AsyncOpenAI:
        transport = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app))
        return openai.AsyncOpenAI(api_key=key, base_url="http://gateway/v1", http_client=transport, max_retries=0)

    def decisions(self) -> list[tuple[str, int]]:
        return [(event.action, event.decision) for _, event in self.audit.published]  # type: ignore[attr-defined]


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    yield Gateway()


async def test_chat_completion_has_the_shape_the_openai_client_reads(gateway: Gateway) -> None:
    completion = await gateway.openai().chat.completions.create(
        model="smollm2", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=2, temperature=0.5, stop=["\n"],
    )
    assert completion.object == "chat.completion" and completion.model == "smollm2"
    assert completion.choices[0].message.content == "Hello"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (7, 2, 9)
    sent = gateway.inference.requests[0]
    assert [(m.role, m.content) for m in sent.messages.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert (sent.sampling.max_new_tokens, round(sent.sampling.temperature, 3), list(sent.sampling.stop)) == (2, 0.5, ["\n"])
    assert gateway.inference.callers == ["alice"]  # the call acts for the caller, not for the gateway


async def test_chat_stream_delivers_deltas_then_finish_then_usage(gateway: Gateway) -> None:
    stream = await gateway.openai().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "Hello"
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 9
    assert len({chunk.id for chunk in chunks}) == 1


async def test_completions_send_the_raw_prompt(gateway: Gateway) -> None:
    completion = await gateway.openai().completions.create(model="smollm2", prompt="Once upon")
    assert completion.object == "text_completion" and completion.choices[0].text == "Hello"
    assert gateway.inference.requests[0].prompt == "Once upon"
    stream = await gateway.openai().completions.create(model="smollm2", prompt="Once upon", stream=True)
    assert "".join([chunk.choices[0].text async for chunk in stream]) == "Hello"


async def test_the_assistant_model_returns_citations_and_its_session(gateway: Gateway) -> None:
    client = gateway.openai()
    response = await client.chat.completions.with_raw_response.create(
        model="llmos-assistant", messages=[{"role": "user", "content": "Are returns free?"}], user="u1",
    )
    completion = response.parse()
    assert completion.choices[0].message.content == "Returns are free."
    assert completion.model_extra is not None
    assert completion.model_extra["citations"] == [{"document_id": "returns", "title": "Returns", "chunk_id": "c1", "score": pytest.approx(0.8)}]
    assert completion.model_extra["session_id"] == "s-new" and response.headers[SESSION_HEADER] == "s-new"
    assert completion.model_extra["intent"]["name"] == "returns"
    # The session carries on by the body field or the header.
    await client.chat.completions.create(model="llmos-assistant", messages=[{"role": "user", "content": "And shoes?"}], extra_body={"session_id": "s-new"})
    await client.chat.completions.create(model="llmos-assistant", messages=[{"role": "user", "content": "Socks?"}], extra_headers={SESSION_HEADER: "s-7"})
    assert [(r.session_id, r.message, r.user_id) for r in gateway.dialogue.requests] == [
        ("", "Are returns free?", "u1"), ("s-new", "And shoes?", ""), ("s-7", "Socks?", "")]
    stream = await client.chat.completions.create(model="llmos-assistant", messages=[{"role": "user", "content": "Hi"}], stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].model_extra is not None and chunks[-1].model_extra["citations"][0]["document_id"] == "returns"
    assert gateway.decisions() == [("POST /v1/chat/completions", ALLOW)] * 4  # each turn audited, as Chat is


class HeldPublisher(MemoryPublisher):
    """A bus that stores (or, `fails`, loses) each record only once `release` is set."""

    def __init__(self, fails: bool) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.fails = fails

    async def publish(self, subject: str, message: Any, msg_id: str | None = None) -> None:
        await asyncio.wait_for(self.release.wait(), timeout=5)
        if self.fails:
            raise ConnectionError("bus gone")
        await super().publish(subject, message, msg_id)


@pytest.mark.parametrize("fails", [False, True])
async def test_a_turn_starts_while_its_record_is_published_and_fails_closed(fails: bool) -> None:
    held = HeldPublisher(fails)
    gateway = Gateway(held)

    async def release_once_the_turn_started() -> bool:
        """Whether the turn started before its record was stored (released after 2 s regardless)."""
        for _ in range(200):
            if gateway.dialogue.requests:
                break
            await asyncio.sleep(0.01)
        held.release.set()
        return bool(gateway.dialogue.requests)

    async with gateway.http() as http:
        releasing = asyncio.create_task(release_once_the_turn_started())
        response = await http.post("/v1/chat/completions", json={"model": "llmos-assistant", "messages": [{"role": "user", "content": "Hi"}]})
        assert await releasing, "the turn waited for its audit record"
    if fails:  # the answer was ready, but without its record it is not given
        assert response.status_code == 503 and "audit record could not be published" in response.json()["error"]["message"]
        assert "Returns are free." not in response.text
    else:
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "Returns are free."
        assert gateway.decisions() == [("POST /v1/chat/completions", ALLOW)]


async def test_embeddings_as_floats_and_as_base64(gateway: Gateway) -> None:
    client = gateway.openai()
    floats = await client.embeddings.create(model="minilm", input=["ab", "abcd"], encoding_format="float")
    assert [item.embedding for item in floats.data] == [[pytest.approx(0.2), 0.5, -0.25], [pytest.approx(0.4), 0.5, -0.25]]
    assert floats.usage.prompt_tokens == 8 and floats.model == "minilm"
    async with gateway.http() as http:
        raw = (await http.post("/v1/embeddings", json={"model": "minilm", "input": "ab", "encoding_format": "base64"})).json()
    assert np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4").tolist() == pytest.approx([0.2, 0.5, -0.25])


async def test_models_list_every_kind(gateway: Gateway) -> None:
    models = {model.id: model.model_extra["llmos"]["role"] async for model in gateway.openai().models.list()}  # type: ignore[index]
    assert models == {"smollm2": "generation", "minilm": "embedding", "llmos-assistant": "assistant",
                      "pocketsphinx": "transcription", "pocketsphinx-domain": "transcription", "kokoro": "speech"}


async def test_a_stereo_44k_flac_is_down_mixed_and_resampled_for_recognition(gateway: Gateway) -> None:
    rate = 44_100
    left = np.sin(np.linspace(0, 440 * 2 * np.pi, rate)) * 0.5
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([left, -left * 0.0 + left], axis=1), rate, format="FLAC")
    transcription = await gateway.openai().audio.transcriptions.create(model="pocketsphinx", file=("clip.flac", buffer.getvalue()))
    assert transcription.text == "hello world"
    config, audio = gateway.speech.recognized[0]
    assert (config.encoding, config.sample_rate_hertz, config.model) == (speech_pb2.AUDIO_ENCODING_LINEAR_PCM, 16_000, "general")
    assert abs(len(audio) // 2 - 16_000) <= 2  # one second at 16 kHz, 16-bit mono
    text = await gateway.openai().audio.transcriptions.create(model="pocketsphinx", file=("clip.flac", buffer.getvalue()), response_format="text")
    assert str(text).strip() == "hello world"


async def test_undecodable_audio_is_a_bad_request(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError, match="cannot decode"):
        await gateway.openai().audio.transcriptions.create(model="pocketsphinx", file=("clip.mp3", b"not audio at all"))


async def test_speech_returns_wav_or_24k_pcm(gateway: Gateway) -> None:
    client = gateway.openai()
    audio = await client.audio.speech.create(model="kokoro", voice="af_heart", input="Hello.", response_format="wav")
    assert audio.content == b"RIFF-fake" and audio.response.headers["content-type"] == "audio/wav"
    await client.audio.speech.create(model="kokoro", voice="af_heart", input="Hello.", response_format="pcm")
    assert [(r.encoding, r.sample_rate_hz) for r in gateway.speech.synthesized] == [
        (speech_pb2.AUDIO_ENCODING_WAV, 0), (speech_pb2.AUDIO_ENCODING_LINEAR_PCM, 24_000)]
    with pytest.raises(openai.BadRequestError, match="mp3"):
        await client.audio.speech.create(model="kokoro", voice="af_heart", input="Hello.", response_format="mp3")
    with pytest.raises(openai.BadRequestError, match="voice"):
        await client.audio.speech.create(model="kokoro", voice="alloy", input="Hello.")


async def test_each_error_status_reaches_the_client_as_its_exception(gateway: Gateway) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.AuthenticationError):
        await gateway.openai(key="wrong").chat.completions.create(model="smollm2", messages=messages)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError) as not_found:
        await gateway.openai().chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await gateway.openai().chat.completions.create(model="smollm2", messages=messages, n=2)  # type: ignore[arg-type]
    assert bad.value.param == "n"
    with pytest.raises(openai.UnprocessableEntityError):
        await gateway.openai().chat.completions.create(model="smollm2", messages=[])
    with pytest.raises(openai.APIStatusError) as too_large:
        await gateway.openai().chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x" * 70_000}])
    assert too_large.value.status_code == 413
    for failure, exception, status in (
        (errors.ResourceExhausted("queue full", retry_after_s=1.5), openai.RateLimitError, 429),
        (errors.Unavailable("inference: not ready"), openai.InternalServerError, 503),
        (errors.DeadlineExceeded("inference: too slow"), openai.InternalServerError, 504),
        (errors.PermissionDenied("inference: lacks generate"), openai.PermissionDeniedError, 403),
    ):
        gateway.inference.failure = failure
        with pytest.raises(exception) as raised:
            await gateway.openai().chat.completions.create(model="smollm2", messages=messages)  # type: ignore[arg-type]
        assert raised.value.status_code == status  # type: ignore[attr-defined]
        if status == 429:
            assert raised.value.response.headers["retry-after"] == "2"  # type: ignore[attr-defined]
            assert raised.value.response.headers["retry-after-ms"] == "1500"  # type: ignore[attr-defined]


async def test_a_failure_after_the_first_token_ends_the_stream_with_an_error_event(gateway: Gateway) -> None:
    gateway.inference.failure = errors.Unavailable("inference: the model process exited")
    gateway.inference.fail_after_first = True
    stream = await gateway.openai().chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], stream=True)
    with pytest.raises(openai.APIError, match="model process exited"):
        async for _ in stream:
            pass


async def test_refusals_and_data_access_are_audited(gateway: Gateway) -> None:
    async with gateway.http(key=None) as anonymous:
        assert (await anonymous.get("/v1/models")).status_code == 401
    async with gateway.http() as user:
        forbidden = await user.post("/v1/audit/verify")
        listed = await user.get("/v1/documents", params={"limit": 1})
        await user.get("/v1/models")  # models:read is not data: not audited
    assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "permission_error"
    assert listed.json() == {"object": "list", "has_more": True, "next_page_token": "faq", "data": [
        {"id": "faq", "object": "document", "status": "indexed", "reason": None, "chunk_count": 3, "content_hash": "", "updated_at": None}]}
    assert gateway.decisions() == [("GET /v1/models", DENY), ("POST /v1/audit/verify", DENY), ("GET /v1/documents", ALLOW)]
    assert gateway.audit.published[0][0] == "llmos.audit.gateway"


async def test_documents_are_accepted_as_multipart_or_json(gateway: Gateway) -> None:
    async with gateway.http(key="admin-key") as admin:
        uploaded = await admin.post("/v1/documents", files={"file": ("faq.md", b"# FAQ\nReturns are free.")}, data={"tags": "help, faq"})
        sent = await admin.post("/v1/documents", json={"document_id": "d1", "content": "Returns are free."})
    assert uploaded.status_code == 202 and uploaded.json()["status"] == "chunked"
    assert sent.json()["id"] == "d1"


async def test_no_cors_headers_by_default_and_docs_are_public(gateway: Gateway) -> None:
    async with gateway.http(key=None) as anonymous:
        preflight = await anonymous.options("/v1/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
        docs = await anonymous.get("/docs")
        schema = await anonymous.get("/openapi.json")
    assert "access-control-allow-origin" not in preflight.headers
    assert docs.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]


async def test_each_request_has_a_server_span_whose_context_travels_into_the_grpc_calls(gateway: Gateway) -> None:
    await gateway.openai().chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}])
    servers = [span for span in gateway.spans.get_finished_spans() if span.kind == SpanKind.SERVER]
    chat = [span for span in servers if span.name == "POST /v1/chat/completions"]
    assert len(chat) == 1 and chat[0].attributes is not None and chat[0].attributes["enduser.id"] == "alice"
    trace_id = format(chat[0].context.trace_id, "032x")
    # W3C traceparent of the outgoing call: version-traceid-spanid-flags, inside the request's trace.
    assert gateway.inference.traces and gateway.inference.traces[0].split("-")[1] == trace_id


async def test_document_ids_may_hold_slashes(gateway: Gateway) -> None:
    async with gateway.http() as user:
        found = await user.get("/v1/documents/eu/faq")
    assert found.status_code == 200 and found.json()["id"] == "eu/faq"
    assert gateway.decisions() == [("GET /v1/documents/{document_id}", ALLOW)]  # the route, not the id
    assert gateway.spans.get_finished_spans()[-1].name == "GET /v1/documents/{document_id}"
