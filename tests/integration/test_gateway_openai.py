"""The gateway against a real stack, through the official `openai` client: chat (streamed and
whole), the assistant with citations, embeddings equal to InferenceService.Embed, models,
transcription of a shared speech clip, a speech round trip, documents over REST, and each error
status from real services."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile

from llmos.stack import stop_pids
from tests.conftest import REPO, TEST_API_KEY, RunningStack, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CLIP = REPO.parent / "shared" / "data" / "speech" / "ljspeech_coqui-ai_TTS" / "LJ001-0001.wav"
KB = REPO / "demo" / "kb"
USER_KEY = "user-key-acme"


@dataclass(frozen=True)
class Gateway:
    url: str

    def client(self, key: str = TEST_API_KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=key, base_url=f"{self.url}/v1", max_retries=0, timeout=300)

    def http(self, key: str | None = TEST_API_KEY) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=300)


def start_gateway(stack: RunningStack, name: str, **overrides: str) -> tuple[subprocess.Popen[bytes], Gateway]:
    port = free_port()
    env = {**stack.env, "LLMOS_GATEWAY_ADDR": f"127.0.0.1:{port}", **overrides}
    with (stack.home / "logs" / f"{name}.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=stack.home, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {(stack.home / 'logs' / f'{name}.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, Gateway(url)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_pids([process.pid], 5)
    raise TimeoutError(f"{name} did not answer /healthz within 60 s")


@pytest.fixture(scope="module")
def gateway(stack: RunningStack) -> Iterator[Gateway]:
    process, running = start_gateway(stack, "gateway", LLMOS_GATEWAY_MAX_JSON_BYTES=str(1024 * 1024))
    try:
        yield running
    finally:
        stop_pids([process.pid], 10)


@pytest.fixture(scope="module")
def degraded_gateway(stack: RunningStack) -> Iterator[Gateway]:
    """A gateway whose speech service is not there and whose calls have half a second."""
    process, running = start_gateway(
        stack, "gateway-degraded", LLMOS_SPEECH_ADDR=f"127.0.0.1:{free_port()}", LLMOS_GATEWAY_TIMEOUT_S="0.5"
    )
    try:
        yield running
    finally:
        stop_pids([process.pid], 10)


async def models_by_role(gateway: Gateway) -> dict[str, list[str]]:
    roles: dict[str, list[str]] = {}
    async for model in gateway.client().models.list():
        roles.setdefault(model.model_extra["llmos"]["role"], []).append(model.id)  # type: ignore[index]
    return roles


async def test_models_lists_generation_embedding_assistant_and_audio(gateway: Gateway) -> None:
    roles = await models_by_role(gateway)
    assert len(roles["generation"]) == 1 and len(roles["embedding"]) == 1
    assert roles["assistant"] == ["llmos-assistant"]
    assert "pocketsphinx" in roles["transcription"] and "kokoro" in roles["speech"]


async def test_chat_completion_whole_and_streamed(gateway: Gateway) -> None:
    model = (await models_by_role(gateway))["generation"][0]
    client = gateway.client(USER_KEY)
    messages = [{"role": "user", "content": "Name three colours."}]
    completion = await client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    assert completion.choices[0].message.content and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens > 0 and completion.usage.prompt_tokens > 5
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
    )
    chunks = [chunk async for chunk in stream]
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) > 3  # token by token, not one piece
    assert streamed == completion.choices[0].message.content  # greedy: the same answer either way
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    text = await client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert text.choices[0].text


async def index(gateway: Gateway, name: str) -> None:
    article = KB / f"{name}.md"
    async with gateway.http() as http:
        submitted = await http.post("/v1/documents", files={"file": (f"{name}.md", article.read_bytes(), "text/markdown")},
                                    data={"document_id": name, "title": article.read_text().splitlines()[0].lstrip("# ")})
        assert submitted.status_code == 202, submitted.text
        for _ in range(600):
            status = (await http.get(f"/v1/documents/{name}")).json()["status"]
            if status == "indexed":
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"{name} not indexed: {status}")


async def test_documents_over_rest_and_the_assistant_cites_them(gateway: Gateway) -> None:
    await index(gateway, "giftcards")
    client = gateway.client()
    response = await client.chat.completions.with_raw_response.create(
        model="llmos-assistant", messages=[{"role": "user", "content": "How long is a gift card valid?"}]
    )
    completion = response.parse()
    assert "three years" in (completion.choices[0].message.content or "")
    extra = completion.model_extra or {}
    assert "giftcards" in {citation["document_id"] for citation in extra["citations"]}
    session = response.headers["X-Llmos-Session-Id"]
    assert extra["session_id"] == session
    # The next turn continues the session, streamed.
    stream = await client.chat.completions.create(
        model="llmos-assistant", messages=[{"role": "user", "content": "Can I use it online?"}], stream=True, extra_body={"session_id": session}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].model_extra and chunks[-1].model_extra["session_id"] == session
    async with gateway.http() as http:
        turns = (await http.get(f"/v1/sessions/{session}")).json()["turns"]
        listed = (await http.get("/v1/documents", params={"limit": 500})).json()
        hits = (await http.get("/v1/search", params={"q": "gift card validity", "top_k": 3})).json()["data"]
        summary = (await http.post("/v1/summarize", json={"document_id": "giftcards", "target_words": 30})).json()
    assert [turn["user_message"] for turn in turns] == ["How long is a gift card valid?", "Can I use it online?"]
    assert "giftcards" in {document["id"] for document in listed["data"]}
    assert hits and hits[0]["document_id"] == "giftcards"
    assert summary["summary"]


async def test_embeddings_equal_inference_embed(gateway: Gateway, stack: RunningStack) -> None:
    from llmos.clients import InferenceClient
    from llmos.grpcutil.client import open_channel

    model = (await models_by_role(gateway))["embedding"][0]
    texts = ["Returns are free within 30 days.", "Gift cards are valid for three years."]
    over_http = await gateway.client().embeddings.create(model=model, input=texts, encoding_format="float")
    base64_encoded = await gateway.client().embeddings.create(model=model, input=texts)  # the client's default: base64
    channel = open_channel(stack.addr("inference"), TEST_API_KEY)
    try:
        over_grpc = await InferenceClient(channel).embed(texts, timeout_s=60)
    finally:
        await channel.close()
    assert np.array_equal(np.array([item.embedding for item in over_http.data], dtype=np.float32), over_grpc)
    assert np.array_equal(np.array([item.embedding for item in base64_encoded.data], dtype=np.float32), over_grpc)
    assert over_http.usage.prompt_tokens > 0


def words(text: str) -> set[str]:
    return {word.strip(".,").lower() for word in text.split()}


async def test_transcription_of_a_shared_clip_in_wav_and_flac_stereo(gateway: Gateway, tmp_path: Path) -> None:
    client = gateway.client()
    wav = await client.audio.transcriptions.create(model="pocketsphinx", file=CLIP)
    reference = words("Printing, in the only sense with which we are at present concerned, differs from most if not from all the arts and crafts represented in the Exhibition")
    assert len(words(wav.text) & reference) >= len(reference) // 2, wav.text
    samples, rate = soundfile.read(CLIP, dtype="float32")
    stereo = tmp_path / "clip.flac"
    soundfile.write(stereo, np.stack([samples, samples], axis=1), rate)
    flac = await client.audio.transcriptions.create(model="pocketsphinx", file=stereo)
    assert flac.text == wav.text  # the same samples after down-mixing


async def test_speech_round_trip(gateway: Gateway, tmp_path: Path) -> None:
    client = gateway.client()
    spoken = await client.audio.speech.create(model="kokoro", voice=(await first_voice(gateway)), input="Gift cards are valid for three years.",
                                              response_format="wav")
    path = tmp_path / "speech.wav"
    path.write_bytes(spoken.content)
    samples, rate = soundfile.read(path)
    assert rate > 8000 and len(samples) / rate > 1.0
    heard = await client.audio.transcriptions.create(model="pocketsphinx", file=path)
    assert len(words(heard.text) & {"gift", "cards", "valid", "three", "years"}) >= 3, heard.text
    pcm = await client.audio.speech.create(model="kokoro", voice=(await first_voice(gateway)), input="Hello.", response_format="pcm")
    assert len(pcm.content) % 2 == 0 and len(pcm.content) > 24_000 * 2 * 0.3


async def first_voice(gateway: Gateway) -> str:
    async for model in gateway.client().models.list():
        if model.id == "kokoro":
            return str(model.model_extra["llmos"]["voices"][0])  # type: ignore[index]
    raise AssertionError("no kokoro voices")


async def test_each_error_status_from_the_real_services(gateway: Gateway, degraded_gateway: Gateway) -> None:
    model = (await models_by_role(gateway))["generation"][0]
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.AuthenticationError):
        await gateway.client("not-a-key").chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]
    async with gateway.http(USER_KEY) as http:
        forbidden = await http.post("/v1/audit/verify")  # audit:verify is the administrators'
    assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "permission_error"
    with pytest.raises(openai.NotFoundError):
        await gateway.client().chat.completions.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as bad:
        await gateway.client().chat.completions.create(model=model, messages=messages, max_tokens=100_000)  # type: ignore[arg-type]
    assert "max_new_tokens" in bad.value.message  # inference's own refusal, with its field
    with pytest.raises(openai.UnprocessableEntityError):
        await gateway.client().chat.completions.create(model=model, messages=[])
    with pytest.raises(openai.APIStatusError) as too_large:
        await gateway.client().embeddings.create(model="any", input="x" * (2 * 1024 * 1024))
    assert too_large.value.status_code == 413
    async with gateway.http() as http:
        missing = await http.get("/v1/documents/no-such-document")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.InternalServerError) as unavailable:
        await degraded_gateway.client().audio.transcriptions.create(model="pocketsphinx", file=CLIP)
    assert unavailable.value.status_code == 503
    with pytest.raises(openai.InternalServerError) as timed_out:
        # Greedy counting goes on to the token limit: seconds, past the degraded gateway's half second
        # (a sampled chat answer could end sooner on a quiet machine).
        await degraded_gateway.client().completions.create(model=model, prompt="Count: 1, 2, 3, 4, 5,", max_tokens=1000, temperature=0)
    assert timed_out.value.status_code == 504


async def test_a_full_embedding_queue_is_429_with_the_schedulers_hint(gateway: Gateway) -> None:
    model = (await models_by_role(gateway))["embedding"][0]
    client = gateway.client()

    async def burst() -> BaseException | None:
        try:
            await client.embeddings.create(model=model, input=[f"word {n}" for n in range(256)], encoding_format="float")
        except openai.RateLimitError as exc:
            return exc
        return None

    outcomes = await asyncio.gather(*(burst() for _ in range(40)))
    refused = [outcome for outcome in outcomes if isinstance(outcome, openai.RateLimitError)]
    assert refused, "40 x 256 texts never filled the 4096-text queue"
    headers = refused[0].response.headers
    assert float(headers["retry-after-ms"]) > 0 and int(headers["retry-after"]) >= 1




async def test_audit_trail_and_recommendations_over_rest(gateway: Gateway) -> None:
    await index(gateway, "returns")
    async with gateway.http(USER_KEY) as user:
        read = await user.get("/v1/documents/returns")  # allowed: audited on llmos.audit.gateway
        searched = await user.get("/v1/search", params={"q": "return an item", "user_id": "alice", "top_k": 3})
        recommended = await user.post("/v1/recommend", json={"user_id": "alice", "include_seen": True})
    assert read.status_code == 200 and searched.status_code == 200
    assert recommended.status_code == 200 and isinstance(recommended.json()["data"], list)
    async with gateway.http() as admin:
        for _ in range(100):  # the audit service stores what the gateway published, in a moment
            records = (await admin.get("/v1/audit", params={"principal": "alice", "limit": 1000})).json()["data"]
            if any(record["event"]["service"] == "gateway" for record in records):
                break
            await asyncio.sleep(0.2)
        verified = (await admin.post("/v1/audit/verify")).json()
    actions = {record["event"]["action"] for record in records if record["event"]["service"] == "gateway"}
    assert {"GET /v1/documents/{document_id}", "GET /v1/search"} <= actions
    assert verified["intact"] is True and int(verified["records_checked"]) > 0
