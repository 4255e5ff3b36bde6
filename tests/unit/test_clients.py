"""The typed clients (llmos.clients) against a real gRPC server in this process, and deadlines.

Fake servicers answer every RPC of protos/llmos/v1 from what the request and its metadata hold,
so each test shows a client call's request, typed result, paging, credentials and error mapping.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime, timezone
import grpc
import numpy as np
import pytest

from llmos import clients, errors
from llmos.clients import (
    AuditClient,
    DialogueClient,
    InferenceClient,
    IngestClient,
    RetrievalClient,
    SpeechClient,
    TokenizerClient,
    stitch,
    transcript,
)
from llmos.deadline import Deadline, timeout_within
from llmos.grpcutil.status import RETRY_AFTER_MS_KEY
from llmos.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    dialogue_pb2,
    dialogue_pb2_grpc,
    events_pb2,
    inference_pb2,
    inference_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    speech_pb2,
    speech_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from services.dialogue.backends import GrpcRetriever
from services.speech.app import document_reader

pytestmark = pytest.mark.unit

TEXT = "Boots may be returned within thirty days. Refunds reach the card in five days. Sale items are final."
# Three chunks of 40 characters overlapping by 10, served two to a page.
CHUNKS = [
    common_pb2.Chunk(document_id="returns", index=index, text=TEXT[start:start + 40], start_offset=start)
    for index, start in enumerate(range(0, len(TEXT) - 10, 30))
]
CALLER = (("authorization", "Bearer caller-key"),)
AUDIT_RECORDS = [
    audit_pb2.AuditRecord(sequence=sequence, event=events_pb2.AuditEvent(principal="alice" if sequence % 2 else "bob"))
    for sequence in range(1, 12)
]
# What a failing call's `document_id` names: the status the fake ingest service answers with.
FAILURES = {
    "INVALID_ARGUMENT": errors.InvalidArgument,
    "NOT_FOUND": errors.NotFound,
    "ALREADY_EXISTS": errors.AlreadyExists,
    "UNAUTHENTICATED": errors.Unauthenticated,
    "PERMISSION_DENIED": errors.PermissionDenied,
    "RESOURCE_EXHAUSTED": errors.ResourceExhausted,
    "FAILED_PRECONDITION": errors.FailedPrecondition,
    "UNAVAILABLE": errors.Unavailable,
    "DEADLINE_EXCEEDED": errors.DeadlineExceeded,
    "UNIMPLEMENTED": errors.Unimplemented,
    "INTERNAL": errors.Unavailable,  # a crash behind the service: retrying later may succeed
}


def caller(context: grpc.aio.ServicerContext) -> str:
    return dict(context.invocation_metadata() or ()).get("authorization", "")


class Audit(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self) -> None:
        self.page_sizes: list[int] = []

    async def Query(self, request: audit_pb2.QueryAuditRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[audit_pb2.AuditRecord]:
        if request.principal == "nobody":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "audit:read is for operators")
        self.page_sizes.append(request.page.page_size)
        after = int(request.page.page_token or 0)
        start = request.start_time.ToSeconds() if request.HasField("start_time") else 0
        matching = [
            record for record in AUDIT_RECORDS
            if record.sequence > after and record.sequence > start and request.principal in ("", record.event.principal)
        ]
        for record in matching[: request.page.page_size]:
            yield record

    async def Verify(self, request: audit_pb2.VerifyAuditRequest, context: grpc.aio.ServicerContext) -> audit_pb2.VerifyAuditResponse:
        return audit_pb2.VerifyAuditResponse(intact=True, records_checked=len(AUDIT_RECORDS))


class Dialogue(dialogue_pb2_grpc.DialogueServiceServicer):
    async def Chat(self, request: dialogue_pb2.ChatRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[dialogue_pb2.ChatResponse]:
        yield dialogue_pb2.ChatResponse(session_id="s1", intent=dialogue_pb2.Intent(name="returns"))
        for word in request.message.split():
            yield dialogue_pb2.ChatResponse(session_id="s1", delta=word + " ")
        yield dialogue_pb2.ChatResponse(session_id="s1", final=True, citations=[dialogue_pb2.Citation(document_id=caller(context))])

    async def Converse(
        self, requests: AsyncIterator[dialogue_pb2.ConverseRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dialogue_pb2.ConverseResponse]:
        config = (await anext(aiter(requests))).config
        heard = b"".join([request.audio_content async for request in requests])
        result = speech_pb2.SpeechRecognitionResult(alternatives=[speech_pb2.SpeechRecognitionAlternative(transcript=heard.decode())], is_final=True)
        yield dialogue_pb2.ConverseResponse(session_id=config.session_id, transcript=result)
        yield dialogue_pb2.ConverseResponse(session_id=config.session_id, answer_delta=config.voice_name)
        yield dialogue_pb2.ConverseResponse(session_id=config.session_id, turn_completed=dialogue_pb2.ChatResponse(final=True))

    async def Summarize(self, request: dialogue_pb2.SummarizeRequest, context: grpc.aio.ServicerContext) -> dialogue_pb2.SummarizeResponse:
        return dialogue_pb2.SummarizeResponse(summary=request.text[: request.target_words], mode=request.mode)

    async def GetSession(self, request: dialogue_pb2.GetSessionRequest, context: grpc.aio.ServicerContext) -> dialogue_pb2.Session:
        if request.session_id != "s1":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id}")
        return dialogue_pb2.Session(session_id="s1", tenant=request.tenant, turns=[dialogue_pb2.Turn(user_message="hi")])

    async def EndSession(self, request: dialogue_pb2.EndSessionRequest, context: grpc.aio.ServicerContext) -> dialogue_pb2.EndSessionResponse:
        return dialogue_pb2.EndSessionResponse(session_id=request.session_id, ended=request.session_id == "s1")


class Ingest(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self) -> None:
        self.status_calls = 0

    async def SubmitDocument(
        self, request: ingest_pb2.SubmitDocumentRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.SubmitDocumentResponse:
        return ingest_pb2.SubmitDocumentResponse(
            document_id=request.document_id, content_hash=caller(context), stage=common_pb2.DOCUMENT_STAGE_RECEIVED
        )

    async def GetDocumentStatus(
        self, request: ingest_pb2.GetDocumentStatusRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.DocumentStatus:
        if request.document_id in FAILURES:
            if request.document_id == "RESOURCE_EXHAUSTED":
                context.set_trailing_metadata(((RETRY_AFTER_MS_KEY, "2500"),))
            await context.abort(grpc.StatusCode[request.document_id], f"{request.document_id.lower()} as asked")
        if request.document_id == "slow":
            await asyncio.sleep(5)
        self.status_calls += 1
        # Indexed on the third look; "broken" fails at once; "stuck" never gets further.
        stage = {"broken": common_pb2.DOCUMENT_STAGE_FAILED, "stuck": common_pb2.DOCUMENT_STAGE_CHUNKED}.get(
            request.document_id,
            common_pb2.DOCUMENT_STAGE_INDEXED if self.status_calls >= 3 else common_pb2.DOCUMENT_STAGE_CHUNKED,
        )
        return ingest_pb2.DocumentStatus(document_id=request.document_id, tenant=request.tenant or "acme", stage=stage)

    async def ListDocuments(
        self, request: ingest_pb2.ListDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.ListDocumentsResponse:
        """Documents d0..d4, in id order after the token; `page_size` of them a page."""
        after = request.page.page_token
        names = [name for name in (f"d{index}" for index in range(5)) if name > after][: request.page.page_size]
        token = names[-1] if names and names[-1] != "d4" else ""
        statuses = [ingest_pb2.DocumentStatus(document_id=name, stage=request.stage) for name in names]
        return ingest_pb2.ListDocumentsResponse(documents=statuses, page=common_pb2.PageResponse(next_page_token=token))

    async def DeleteDocument(
        self, request: ingest_pb2.DeleteDocumentRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.DeleteDocumentResponse:
        return ingest_pb2.DeleteDocumentResponse(document_id=request.document_id, deleted=request.document_id == "returns")


class Inference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        words = request.messages.messages[-1].content.split()
        if words == ["forever"]:
            try:
                while True:
                    yield inference_pb2.GenerateResponse(delta="again ")
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        for index, word in enumerate(words[: request.sampling.max_new_tokens]):
            yield inference_pb2.GenerateResponse(delta=word, token_ids=[index])
        yield inference_pb2.GenerateResponse(
            finish_reason=inference_pb2.FINISH_REASON_LENGTH, usage=inference_pb2.GenerationUsage(generated_tokens=len(words))
        )

    async def Embed(self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext) -> inference_pb2.EmbedResponse:
        return inference_pb2.EmbedResponse(
            model=request.model or "all-minilm-l6-v2", dimensions=2, prompt_tokens=len(request.texts),
            embeddings=[inference_pb2.Embedding(values=[len(text), request.priority]) for text in request.texts],
        )

    async def ListModels(self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(models=[inference_pb2.ModelInfo(name="qwen", role=inference_pb2.MODEL_ROLE_GENERATION)])


class Retrieval(retrieval_pb2_grpc.RetrievalServiceServicer):
    """GetDocument of one document, two chunks a page (any other document is not found)."""

    def __init__(self) -> None:
        self.readers: list[str] = []

    async def Search(self, request: retrieval_pb2.SearchRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.SearchResponse:
        hits = [
            retrieval_pb2.ScoredChunk(chunk=chunk, score=1.0 / (chunk.index + 1))
            for chunk in CHUNKS if not request.filter.document_ids or chunk.document_id in request.filter.document_ids
        ]
        return retrieval_pb2.SearchResponse(hits=hits[: request.top_k], mode=request.mode)

    async def Recommend(self, request: retrieval_pb2.RecommendRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.RecommendResponse:
        return retrieval_pb2.RecommendResponse(
            recommendations=[retrieval_pb2.Recommendation(document_id="returns", reason=f"for {request.user_id}")][: request.top_k]
        )

    async def GetDocument(
        self, request: retrieval_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.GetDocumentResponse:
        if request.document_id != "returns":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no document {request.document_id}")
        if request.user_id:
            self.readers.append(request.user_id)
        start = int(request.page.page_token or 0)
        token = str(start + 2) if start + 2 < len(CHUNKS) else ""
        return retrieval_pb2.GetDocumentResponse(
            document_id="returns", title="Returns", source="kb/returns.md", tags=["policy"], chunk_count=len(CHUNKS),
            chunks=CHUNKS[start:start + 2], page=common_pb2.PageResponse(next_page_token=token),
        )


class Speech(speech_pb2_grpc.SpeechServiceServicer):
    async def Recognize(self, request: speech_pb2.RecognizeRequest, context: grpc.aio.ServicerContext) -> speech_pb2.RecognizeResponse:
        return speech_pb2.RecognizeResponse(results=[heard(part) for part in request.audio.split(b"|")])

    async def StreamingRecognize(
        self, requests: AsyncIterator[speech_pb2.StreamingRecognizeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[speech_pb2.StreamingRecognizeResponse]:
        first = await anext(aiter(requests))
        assert first.HasField("streaming_config")
        async for request in requests:
            yield speech_pb2.StreamingRecognizeResponse(results=[heard(request.audio_content)])

    async def Synthesize(
        self, request: speech_pb2.SynthesizeSpeechRequest, context: grpc.aio.ServicerContext
    ) -> speech_pb2.SynthesizeSpeechResponse:
        return speech_pb2.SynthesizeSpeechResponse(audio=request.text.encode(), sample_rate_hz=request.sample_rate_hz or 24000)

    async def SynthesizeStream(
        self, request: speech_pb2.SynthesizeSpeechRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[speech_pb2.SynthesizeSpeechResponse]:
        for sentence in request.text.split(". "):
            yield speech_pb2.SynthesizeSpeechResponse(audio=sentence.encode(), text=sentence)

    async def ListVoices(self, request: speech_pb2.ListVoicesRequest, context: grpc.aio.ServicerContext) -> speech_pb2.ListVoicesResponse:
        voices = [speech_pb2.Voice(name="af_heart", language_code="en-US"), speech_pb2.Voice(name="ff_siwis", language_code="fr-FR")]
        return speech_pb2.ListVoicesResponse(voices=[v for v in voices if request.language_code in ("", v.language_code)])


def heard(audio: bytes) -> speech_pb2.SpeechRecognitionResult:
    return speech_pb2.SpeechRecognitionResult(alternatives=[speech_pb2.SpeechRecognitionAlternative(transcript=audio.decode())], is_final=True)


class Tokenizer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """One token per character."""

    async def Tokenize(self, request: tokenizer_pb2.TokenizeRequest, context: grpc.aio.ServicerContext) -> tokenizer_pb2.TokenizeResponse:
        return tokenizer_pb2.TokenizeResponse(
            ids=[ord(c) for c in request.text], tokens=list(request.text),
            offsets=[tokenizer_pb2.TokenOffset(start=i, end=i + 1) for i in range(len(request.text))],
        )

    async def Detokenize(self, request: tokenizer_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext) -> tokenizer_pb2.DetokenizeResponse:
        return tokenizer_pb2.DetokenizeResponse(text="".join(map(chr, request.ids)))

    async def CountTokens(self, request: tokenizer_pb2.CountTokensRequest, context: grpc.aio.ServicerContext) -> tokenizer_pb2.CountTokensResponse:
        counts = [len(text) + 2 * request.add_special_tokens for text in request.texts]
        return tokenizer_pb2.CountTokensResponse(counts=counts, total=sum(counts))

    async def ApplyChatTemplate(
        self, request: tokenizer_pb2.ApplyChatTemplateRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.ApplyChatTemplateResponse:
        prompt = "".join(f"<{m.role}>{m.content}" for m in request.messages) + ("<assistant>" if request.add_generation_prompt else "")
        return tokenizer_pb2.ApplyChatTemplateResponse(prompt=prompt, token_count=len(prompt))


class Fakes:
    def __init__(self) -> None:
        self.audit, self.ingest, self.inference, self.retrieval = Audit(), Ingest(), Inference(), Retrieval()


@pytest.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Channel, Fakes]]:
    """One in-process server answering every service, and a channel to it."""
    fakes = Fakes()
    server = grpc.aio.server()
    audit_pb2_grpc.add_AuditServiceServicer_to_server(fakes.audit, server)
    dialogue_pb2_grpc.add_DialogueServiceServicer_to_server(Dialogue(), server)
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(fakes.ingest, server)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(fakes.inference, server)
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(fakes.retrieval, server)
    speech_pb2_grpc.add_SpeechServiceServicer_to_server(Speech(), server)
    tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(Tokenizer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, fakes
    await server.stop(None)


@pytest.fixture
async def retrieval(served: tuple[grpc.aio.Channel, Fakes]) -> RetrievalClient:
    return RetrievalClient(served[0])


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def test_every_rpc_of_the_protos_has_a_client_call() -> None:
    """Each service's stub methods, as the clients call them (`self._stub.<Method>`), against the
    services in the generated descriptors."""
    called: dict[str, set[str]] = {}
    for client in (AuditClient, DialogueClient, IngestClient, InferenceClient, RetrievalClient, SpeechClient, TokenizerClient):
        tree = ast.parse(inspect.getsource(inspect.getmodule(client)))  # type: ignore[arg-type]
        methods = {
            node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "_stub"
        }
        called[client.service] = methods
    modules = (audit_pb2, dialogue_pb2, ingest_pb2, inference_pb2, retrieval_pb2, speech_pb2, tokenizer_pb2)
    for module in modules:
        for service in module.DESCRIPTOR.services_by_name.values():
            name = service.name.removesuffix("Service").lower()
            missing = {method.name for method in service.methods} - called.get(name, set())
            assert not missing, f"{service.full_name}: no client call for {sorted(missing)}"
    assert set(clients.__all__) >= {"AuditClient", "IngestClient", "DialogueClient", "SpeechClient"}


def test_chunks_are_stitched_without_their_overlap() -> None:
    text = "abcdefghijklmnopqrstuvwxyz"
    chunks = [common_pb2.Chunk(index=1, text=text[8:20], start_offset=8), common_pb2.Chunk(index=0, text=text[:12], start_offset=0)]
    assert stitch(chunks) == text[:20]


async def test_dialogue_and_speech_read_a_document_the_same_way(retrieval: RetrievalClient) -> None:
    title, dialogue_text = await GrpcRetriever(retrieval).document("acme", "returns", 5.0)
    speech_text = await document_reader(retrieval)("acme", "returns")
    assert title == "Returns"
    assert dialogue_text == speech_text == TEXT  # every page read, each overlap once


async def test_retrieval_calls(served: tuple[grpc.aio.Channel, Fakes], retrieval: RetrievalClient) -> None:
    document = await retrieval.read_document("acme", "returns", user_id="alice", timeout_s=5)
    assert (document.title, document.source, document.tags, len(document.chunks)) == ("Returns", "kb/returns.md", ["policy"], 3)
    assert document.text == TEXT
    assert served[1].retrieval.readers == ["alice"]  # the read is recorded once, not once a page
    page = await retrieval.document_page("acme", "returns", page_size=2, timeout_s=5)
    assert [chunk.index for chunk in page.chunks] == [0, 1] and page.page.next_page_token == "2"
    hits = await retrieval.search("acme", "boots", 2, 5.0, search_filter=retrieval_pb2.SearchFilter(document_ids=["returns"]))
    assert [hit.chunk.index for hit in hits] == [0, 1]
    assert await retrieval.search("acme", "boots", 2, 5.0, search_filter=retrieval_pb2.SearchFilter(document_ids=["other"])) == []
    recommendations = await retrieval.recommend("alice", top_k=1, timeout_s=5)
    assert [(r.document_id, r.reason) for r in recommendations] == [("returns", "for alice")]


async def test_dialogue_calls_carry_the_callers_credentials(served: tuple[grpc.aio.Channel, Fakes]) -> None:
    dialogue = DialogueClient(served[0], CALLER)
    responses = [response async for response in dialogue.chat(dialogue_pb2.ChatRequest(message="how long"), 5.0)]
    assert responses[0].intent.name == "returns"
    assert "".join(r.delta for r in responses) == "how long "
    assert responses[-1].final and responses[-1].citations[0].document_id == "Bearer caller-key"
    other = dialogue.with_credentials((("authorization", "Bearer other"),))
    final = [response async for response in other.chat(dialogue_pb2.ChatRequest(message="x"), 5.0)][-1]
    assert final.citations[0].document_id == "Bearer other"

    config = dialogue_pb2.ConverseConfig(session_id="s1", voice_name="af_heart")
    events = [event async for event in dialogue.converse(config, chunks_of(b"where is ", b"my order"), timeout_s=5)]
    assert [event.WhichOneof("event") for event in events] == ["transcript", "answer_delta", "turn_completed"]
    assert events[0].transcript.alternatives[0].transcript == "where is my order" and events[1].answer_delta == "af_heart"

    summary = await dialogue.summarize(
        dialogue_pb2.SummarizeRequest(text="one two three", target_words=3, mode=dialogue_pb2.SUMMARY_MODE_ABSTRACTIVE), timeout_s=5
    )
    assert (summary.summary, summary.mode) == ("one", dialogue_pb2.SUMMARY_MODE_ABSTRACTIVE)
    session = await dialogue.session("s1", tenant="acme", timeout_s=5)
    assert (session.tenant, [turn.user_message for turn in session.turns]) == ("acme", ["hi"])
    with pytest.raises(errors.NotFound, match="^dialogue: no session gone"):
        await dialogue.session("gone", timeout_s=5)
    assert await dialogue.end_session("s1", timeout_s=5) is True
    assert await dialogue.end_session("gone", timeout_s=5) is False


async def test_ingest_calls_and_waiting_until_settled(served: tuple[grpc.aio.Channel, Fakes]) -> None:
    ingest = IngestClient(served[0], CALLER)
    submitted = await ingest.submit(ingest_pb2.SubmitDocumentRequest(document_id="returns", content=b"x"), timeout_s=5)
    assert (submitted.document_id, submitted.content_hash, submitted.stage) == ("returns", "Bearer caller-key", common_pb2.DOCUMENT_STAGE_RECEIVED)
    assert (await ingest.status("returns", tenant="globex", timeout_s=5)).tenant == "globex"
    assert await ingest.delete("returns", timeout_s=5) is True
    assert await ingest.delete("never-there", timeout_s=5) is False

    listed = [status async for status in ingest.documents(stage=common_pb2.DOCUMENT_STAGE_FAILED, page_size=2, timeout_s=5)]
    assert [status.document_id for status in listed] == ["d0", "d1", "d2", "d3", "d4"]  # three pages
    assert {status.stage for status in listed} == {common_pb2.DOCUMENT_STAGE_FAILED}
    page = await ingest.documents_page(page_size=2, page_token="d1", timeout_s=5)
    assert [status.document_id for status in page.documents] == ["d2", "d3"] and page.page.next_page_token == "d3"

    settled = await ingest.wait_until_settled(["returns", "broken"], within_s=5, poll_s=0.01, timeout_s=5)
    assert {name: status.stage for name, status in settled.items()} == {
        "returns": common_pb2.DOCUMENT_STAGE_INDEXED, "broken": common_pb2.DOCUMENT_STAGE_FAILED
    }
    unsettled = await ingest.wait_until_settled(["stuck"], within_s=0.05, poll_s=0.01, timeout_s=5)
    assert unsettled["stuck"].stage == common_pb2.DOCUMENT_STAGE_CHUNKED  # given up on after within_s, last stage reported


async def test_inference_calls(served: tuple[grpc.aio.Channel, Fakes]) -> None:
    inference = InferenceClient(served[0])
    vectors = await inference.embed(["ab", "abcd"], 5.0, priority=common_pb2.PRIORITY_BATCH)
    assert vectors.dtype == np.float32 and vectors.tolist() == [[2, common_pb2.PRIORITY_BATCH], [4, common_pb2.PRIORITY_BATCH]]
    response = await inference.embed_response(["ab"], model="e5", timeout_s=5)
    assert (response.model, response.dimensions, response.prompt_tokens) == ("e5", 2, 1)
    assert [delta async for delta in inference.generate_stream([("user", "a b c")], 2, 5.0)] == ["a", "b"]
    request = inference_pb2.GenerateRequest(
        messages=clients.chat_messages([("user", "a b c")]), sampling=inference_pb2.SamplingParams(max_new_tokens=5)
    )
    messages = [response async for response in inference.generate(request, timeout_s=5)]
    assert [list(m.token_ids) for m in messages[:-1]] == [[0], [1], [2]]
    assert messages[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH and messages[-1].usage.generated_tokens == 3
    assert [(model.name, model.role) for model in await inference.models(timeout_s=5)] == [("qwen", inference_pb2.MODEL_ROLE_GENERATION)]


async def test_a_reader_that_stops_early_cancels_the_call(served: tuple[grpc.aio.Channel, Fakes]) -> None:
    inference = InferenceClient(served[0])
    async with aclosing(inference.generate_stream([("user", "forever")], 0, 5.0)) as deltas:
        async for delta in deltas:
            assert delta == "again "
            break
    await asyncio.wait_for(served[1].inference.cancelled.wait(), 2.0)


async def test_speech_calls(served: tuple[grpc.aio.Channel, Fakes]) -> None:
    speech = SpeechClient(served[0])
    config = speech_pb2.RecognitionConfig(encoding=speech_pb2.AUDIO_ENCODING_WAV)
    results = await speech.recognize(config, b"where is|my order", timeout_s=5)
    assert transcript(results) == "where is my order"
    streamed = [result async for result in speech.recognize_stream(speech_pb2.StreamingRecognitionConfig(config=config), chunks_of(b"a", b"b"), 5.0)]
    assert [result.alternatives[0].transcript for result in streamed] == ["a", "b"]
    whole = await speech.synthesize(speech_pb2.SynthesizeSpeechRequest(text="Hello there", sample_rate_hz=16000), timeout_s=5)
    assert (whole.audio, whole.sample_rate_hz) == (b"Hello there", 16000)
    pieces = [piece.text async for piece in speech.synthesize_stream(speech_pb2.SynthesizeSpeechRequest(text="One. Two"), 5.0)]
    assert pieces == ["One", "Two"]
    assert [voice.name for voice in await speech.voices(language_code="fr-FR", timeout_s=5)] == ["ff_siwis"]
    assert len(await speech.voices(timeout_s=5)) == 2


async def test_tokenizer_calls(served: tuple[grpc.aio.Channel, Fakes]) -> None:
    tokenizer = TokenizerClient(served[0])
    assert await tokenizer.count(["ab", "abc"], 5.0) == [2, 3]
    assert await tokenizer.count(["ab"], 5.0, add_special_tokens=True) == [4]
    assert (await tokenizer.count_response(["ab", "abc"], timeout_s=5)).total == 5
    assert await tokenizer.token_offsets("ab", 5.0) == [(0, 1), (1, 2)]
    assert list((await tokenizer.tokenize("hi", timeout_s=5)).tokens) == ["h", "i"]
    assert await tokenizer.detokenize([104, 105], timeout_s=5) == "hi"
    templated = await tokenizer.apply_chat_template([("user", "hi")], timeout_s=5)
    assert (templated.prompt, templated.token_count) == ("<user>hi<assistant>", 19)


async def test_audit_query_reads_every_page_or_stops_at_the_limit(served: tuple[grpc.aio.Channel, Fakes]) -> None:
    audit = AuditClient(served[0], CALLER)
    everything = [record.sequence async for record in audit.query(page_size=4, timeout_s=5)]
    assert everything == list(range(1, 12))
    assert served[1].audit.page_sizes == [4, 4, 4]  # the short third page ends the query
    alice = [record.sequence async for record in audit.query(principal="alice", after_sequence=4, page_size=2, timeout_s=5)]
    assert alice == [5, 7, 9, 11]
    assert [record.sequence async for record in audit.query(limit=5, page_size=4, timeout_s=5)] == [1, 2, 3, 4, 5]
    since = datetime.fromtimestamp(8, timezone.utc)
    assert [record.sequence async for record in audit.query(since=since, timeout_s=5)] == [9, 10, 11]
    verdict = await audit.verify(timeout_s=5)
    assert verdict.intact and verdict.records_checked == 11
    with pytest.raises(errors.PermissionDenied, match="^audit: audit:read is for operators"):
        [record async for record in audit.query(principal="nobody", timeout_s=5)]


@pytest.mark.parametrize("code", sorted(FAILURES))
async def test_a_failed_call_is_the_platform_error_named_after_the_service(served: tuple[grpc.aio.Channel, Fakes], code: str) -> None:
    with pytest.raises(FAILURES[code]) as raised:
        await IngestClient(served[0]).status(code, timeout_s=5)
    assert f"{code.lower()} as asked" in raised.value.message and raised.value.message.startswith("ingest")
    if code == "RESOURCE_EXHAUSTED":
        assert raised.value.retry_after_s == 2.5  # type: ignore[attr-defined]  # the service's trailer, not a guess
    if code == "INVALID_ARGUMENT":
        assert raised.value.field == "ingest"  # type: ignore[attr-defined]


async def test_a_missing_document_is_not_found(retrieval: RetrievalClient) -> None:
    with pytest.raises(errors.NotFound, match="^retrieval: no document missing"):
        await retrieval.document("acme", "missing", 5.0)


async def test_a_call_past_its_timeout_is_deadline_exceeded(served: tuple[grpc.aio.Channel, Fakes]) -> None:
    with pytest.raises(errors.DeadlineExceeded, match="^ingest: "):
        await IngestClient(served[0]).status("slow", timeout_s=0.1)


async def test_an_unreachable_service_is_unavailable() -> None:
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        with pytest.raises(errors.Unavailable, match="^speech: "):
            await SpeechClient(channel).voices(timeout_s=2)


async def test_a_deadline_gives_each_call_the_time_left_and_fails_once_passed() -> None:
    assert timeout_within(None, 7.0) == 7.0
    assert 0.0 < timeout_within(Deadline.after(5.0), 7.0) <= 5.0
    passed = Deadline.after(0.01)
    await asyncio.sleep(0.02)
    assert passed.expired
    with pytest.raises(errors.DeadlineExceeded):
        timeout_within(passed, 7.0)


def test_a_document_is_a_plain_value() -> None:
    """`Document` is a plain value: equal documents compare equal, its text is the stitched chunks."""
    one = clients.Document("returns", "Returns", "", [], list(CHUNKS))
    assert one == clients.Document("returns", "Returns", "", [], list(CHUNKS)) and one.text == TEXT
