"""Each service has its own identity and forwards no API key (issue 13, item 5).

A call one service makes to another carries an Ed25519-signed assertion (llmos.assertions) of
the principal it acts for, addressed to the callee, valid for seconds. Checked over real gRPC:
the tokenizer and the inference service, served here behind the platform's own server
interceptor with a recorder in front, receive no API key from real ingest and retrieval
processes, only assertions; on the running stack, an assertion for another audience, expired,
long-lived, replayed, forged or from a service not allowed that RPC is refused, and a service
acting for an event's tenant or a caller's cannot reach another tenant. The assertions here are
made with PyJWT directly, from the stack's keys, not with the code under test.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from llmos.assertions import ServiceKeys
from llmos.bus.subjects import INGEST_REQUESTED
from llmos.grpcutil.interceptors import ServerInterceptor
from llmos.keys import KeyAuthenticator, parse_static_keys
from llmos.models import artefact_dir
from llmos.settings import PlatformSettings
from llmos.stack import stop_pids, wait_until_serving
from llmos.tokenization import ModelTokenizer
from llmos.v1 import events_pb2, inference_pb2, inference_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from llmos.v1 import retrieval_pb2, retrieval_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from services.tokenizer.core import TokenizerCore
from services.tokenizer.servicer import TokenizerServicer
from tests.conftest import TEST_API_KEY, TEST_KEYS, NatsServer, RunningStack, _settings_from, platform_environment, running_nats_server
from tests.integration.bus_helpers import publish

pytestmark = pytest.mark.security

TOKENIZE = "/llmos.v1.TokenizerService/Tokenize"
EMBED = "/llmos.v1.InferenceService/Embed"
DIMENSIONS = 384


# ----------------------------------------------------------------------------- assertions by hand


def _raw(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signing_keys(env: dict[str, str]) -> dict[str, Ed25519PrivateKey]:
    entries = (entry.partition(":") for entry in env["LLMOS_SERVICE_SIGNING_KEYS"].split(","))
    return {service: Ed25519PrivateKey.from_private_bytes(_raw(key)) for service, _, key in entries}


def claims(issuer: str, audience: str, subject: str = "tester", tenant: str = "acme", roles: tuple[str, ...] = ("admin",),
           issued: float | None = None, lifetime_s: int = 10) -> dict[str, Any]:
    now = int(time.time() if issued is None else issued)
    return {"iss": issuer, "aud": audience, "sub": subject, "tenant": tenant, "roles": list(roles),
            "iat": now, "exp": now + lifetime_s, "jti": secrets.token_urlsafe(16)}


def signed(key: Ed25519PrivateKey, body: dict[str, Any], kid: str | None = None) -> str:
    return jwt.encode(body, key, algorithm="EdDSA", headers={"kid": kid or body["iss"]})


def service_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Service {token}"),)


async def status_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


# ----------------------------------------------------------------------------- refusals on the stack


@pytest.fixture(scope="module")
def keys(stack: RunningStack) -> dict[str, Ed25519PrivateKey]:
    return signing_keys(stack.env)


async def tokenize(stack: RunningStack, token: str) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(stack.addr("tokenizer")) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        return await status_of(stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="hello"), metadata=service_metadata(token), timeout=10))


async def test_a_valid_assertion_opens_one_call_and_only_one(stack: RunningStack, keys: dict[str, Ed25519PrivateKey]) -> None:
    token = signed(keys["ingest"], claims("ingest", "tokenizer"))
    assert await tokenize(stack, token) == (grpc.StatusCode.OK, "")
    code, details = await tokenize(stack, token)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "used already" in details


def forged_assertions(keys: dict[str, Ed25519PrivateKey]) -> dict[str, tuple[str, str]]:
    """Assertions the tokenizer must refuse, each with (a part of) the reason it gives."""
    stranger = Ed25519PrivateKey.generate()
    public = keys["ingest"].public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {
        "for another audience": (signed(keys["ingest"], claims("ingest", "retrieval")), "not addressed to tokenizer"),
        "expired": (signed(keys["ingest"], claims("ingest", "tokenizer", issued=time.time() - 120)), "expired"),
        "from the future": (signed(keys["ingest"], claims("ingest", "tokenizer", issued=time.time() + 120)), "not yet valid"),
        "long-lived": (signed(keys["ingest"], claims("ingest", "tokenizer", lifetime_s=3600)), "longer than"),
        "bad signature": (signed(stranger, claims("ingest", "tokenizer")), "Signature verification failed"),
        "unknown service": (signed(stranger, claims("tokenizer", "tokenizer")), "not a service whose assertions"),
        "issuer other than its key": (signed(keys["ingest"], claims("dialogue", "tokenizer"), kid="ingest"), "issuer"),
        "unsigned (alg none)": (jwt.encode(claims("ingest", "tokenizer"), None, algorithm="none", headers={"kid": "ingest"}), "alg value is not allowed"),
        "HMAC under the public key": (
            jwt.api_jws.PyJWS().encode(jwt.api_jwt.json.dumps(claims("ingest", "tokenizer")).encode(), public,
                                       algorithm="HS256", headers={"kid": "ingest"}), "alg value is not allowed"),
        "tenant with a separator": (signed(keys["ingest"], claims("ingest", "tokenizer", tenant="acme/eu")), "not a tenant name"),
        "unknown role": (signed(keys["ingest"], claims("ingest", "tokenizer", roles=("root",))), "roles"),
        "not a token": ("llmos_0123456789ab_forged", "not a signed assertion"),
    }


async def test_forged_expired_or_misaddressed_assertions_are_unauthenticated(stack: RunningStack, keys: dict[str, Ed25519PrivateKey]) -> None:
    for case, (token, reason) in forged_assertions(keys).items():
        code, details = await tokenize(stack, token)
        assert code == grpc.StatusCode.UNAUTHENTICATED, f"{case}: {code} {details}"
        assert reason.lower() in details.lower(), f"{case}: {details}"


async def test_a_service_may_call_only_the_rpcs_design_gives_it(stack: RunningStack, keys: dict[str, Ed25519PrivateKey]) -> None:
    async with grpc.aio.insecure_channel(stack.addr("tokenizer")) as channel:
        tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        # speech calls no tokenizer RPC; ingest calls Tokenize, not CountTokens.
        code, details = await status_of(tokenizer.Tokenize(
            tokenizer_pb2.TokenizeRequest(text="hi"), metadata=service_metadata(signed(keys["speech"], claims("speech", "tokenizer"))), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "service 'speech' may not call" in details
        code, _ = await status_of(tokenizer.CountTokens(
            tokenizer_pb2.CountTokensRequest(texts=["hi"]), metadata=service_metadata(signed(keys["ingest"], claims("ingest", "tokenizer"))), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    async with grpc.aio.insecure_channel(stack.addr("inference")) as channel:
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        code, details = await status_of(inference.ListModels(
            inference_pb2.ListModelsRequest(), metadata=service_metadata(signed(keys["retrieval"], claims("retrieval", "inference"))), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "service 'retrieval' may not call" in details
        # An administrator's principal does not widen what the calling service may do.
        generate = inference.Generate(
            inference_pb2.GenerateRequest(prompt="hi"),
            metadata=service_metadata(signed(keys["speech"], claims("speech", "inference"))), timeout=10)
        code, _ = await status_of(_drain(generate))
        assert code == grpc.StatusCode.PERMISSION_DENIED


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def test_a_service_acts_only_for_the_tenant_its_event_or_caller_names(stack: RunningStack, keys: dict[str, Ed25519PrivateKey]) -> None:
    speech_for_acme = claims("speech", "retrieval", subject="bus:llmos.docs.indexed", tenant="acme", roles=("service",))
    alice = claims("dialogue", "retrieval", subject="alice", tenant="acme", roles=("user",))
    async with grpc.aio.insecure_channel(stack.addr("retrieval")) as channel:
        retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel)

        async def get_document(body: dict[str, Any], tenant: str) -> grpc.StatusCode:
            token = signed(keys[body["iss"]], {**body, "jti": secrets.token_urlsafe(16)})
            request = retrieval_pb2.GetDocumentRequest(tenant=tenant, document_id="no-such-document")
            return (await status_of(retrieval.GetDocument(request, metadata=service_metadata(token), timeout=10)))[0]

        # Its own tenant: allowed (the document does not exist); any other: refused.
        assert await get_document(speech_for_acme, "acme") == grpc.StatusCode.NOT_FOUND
        assert await get_document(speech_for_acme, "") == grpc.StatusCode.NOT_FOUND
        assert await get_document(speech_for_acme, "globex") == grpc.StatusCode.PERMISSION_DENIED
        assert await get_document(alice, "acme") == grpc.StatusCode.NOT_FOUND
        assert await get_document(alice, "globex") == grpc.StatusCode.PERMISSION_DENIED


def test_no_api_key_is_a_services() -> None:
    """The one `service` key that could name any tenant is gone: no key may carry that role."""
    with pytest.raises(Exception, match="own identities"):
        parse_static_keys("svc-key=platform:platform:service")


# ----------------------------------------------------------------------------- what callees receive


@dataclass
class Recorder(grpc.aio.ServerInterceptor):
    """Keeps the metadata of every call, before anything else sees it."""

    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails) -> Any:
        metadata = {key: value for key, value in details.invocation_metadata or () if isinstance(value, str)}
        self.calls.append((details.method, metadata))
        return await continuation(details)


class EmbedOnly(inference_pb2_grpc.InferenceServiceServicer):
    async def Embed(self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext) -> inference_pb2.EmbedResponse:
        unit = [1.0] + [0.0] * (DIMENSIONS - 1)
        return inference_pb2.EmbedResponse(dimensions=DIMENSIONS, embeddings=[inference_pb2.Embedding(values=unit) for _ in request.texts])


@dataclass
class Callees:
    env: dict[str, str]
    tokenizer: Recorder
    inference: Recorder


@pytest.fixture(scope="module")
def private_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """Its own nats-server: the ingest and retrieval started here must not share the stack's consumers."""
    with running_nats_server(tmp_path_factory.mktemp("identity-nats") / "jetstream") as server:
        yield server


async def _serve(settings: PlatformSettings, name: str, recorder: Recorder, add: Callable[[grpc.aio.Server], None]) -> grpc.aio.Server:
    authenticator = KeyAuthenticator(parse_static_keys(settings.api_keys), None, ServiceKeys.from_settings(settings).verifier(name))
    server = grpc.aio.server(interceptors=[recorder, ServerInterceptor(name, authenticator)])
    add(server)
    server.add_insecure_port(settings.service_addr(name))
    await server.start()
    return server


@pytest.fixture(scope="module")
async def callees(private_nats: NatsServer, models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Callees]:
    """A real tokenizer and an embedding-only inference service here, called by real ingest and
    retrieval processes."""
    home = tmp_path_factory.mktemp("identity-home")
    env = platform_environment(private_nats, home)
    settings = _settings_from(env)
    tokenizer_model = ModelTokenizer.from_dir(artefact_dir(models_home, "smollm2-135m-instruct"))
    core = TokenizerCore({"smollm2-135m-instruct": tokenizer_model}, "smollm2-135m-instruct", 1_000_000, 1024)
    tokenizer, inference = Recorder(), Recorder()
    servers = [
        await _serve(settings, "tokenizer", tokenizer, lambda s: tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(TokenizerServicer(core), s)),
        await _serve(settings, "inference", inference, lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(EmbedOnly(), s)),
    ]
    processes = {}
    (home / "logs").mkdir()
    for name in ("ingest", "retrieval"):
        with (home / "logs" / f"{name}.log").open("wb") as log:
            processes[name] = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        await asyncio.to_thread(wait_until_serving, settings, processes, 120)
        yield Callees(env, tokenizer, inference)
    finally:
        stop_pids([process.pid for process in processes.values()], timeout_s=15)
        for server in servers:
            await server.stop(None)


def no_api_key_in(recorder: Recorder) -> None:
    api_keys = set(TEST_KEYS)
    for method, metadata in recorder.calls:
        leaked = [key for key in api_keys if any(key in value for value in metadata.values())]
        assert not leaked, f"{method} received the API key(s) {leaked}: {metadata.get('authorization')}"


def assertion_of(env: dict[str, str], metadata: dict[str, str], issuer: str, audience: str) -> dict[str, Any]:
    scheme, _, token = metadata["authorization"].partition(" ")
    assert scheme == "Service"
    public = signing_keys(env)[issuer].public_key()
    body = jwt.decode(token, public, algorithms=["EdDSA"], audience=audience, issuer=issuer)
    assert body["exp"] - body["iat"] <= 10
    return body


async def test_the_tokenizer_receives_an_assertion_never_the_callers_key(callees: Callees) -> None:
    async with grpc.aio.insecure_channel(callees.env["LLMOS_INGEST_ADDR"]) as channel:
        await ingest_pb2_grpc.IngestServiceStub(channel).SubmitDocument(
            ingest_pb2.SubmitDocumentRequest(document_id="keys", content=b"An administrator submits this document."),
            metadata=(("authorization", f"Bearer {TEST_API_KEY}"),), timeout=30)
    calls = [metadata for method, metadata in callees.tokenizer.calls if method == TOKENIZE]
    assert calls, callees.tokenizer.calls
    no_api_key_in(callees.tokenizer)
    body = assertion_of(callees.env, calls[-1], "ingest", "tokenizer")
    assert (body["sub"], body["tenant"], body["roles"]) == ("tester", "acme", ["admin"])


async def test_a_bus_handler_asserts_the_events_tenant_only(callees: Callees) -> None:
    before = len(callees.tokenizer.calls)
    document = events_pb2.DocumentSubmitted(document_id="from-the-bus", tenant="globex", content=b"Published on the bus for globex.")
    await publish(callees.env["LLMOS_NATS_URL"], INGEST_REQUESTED, document.SerializeToString())
    for _ in range(300):
        if len(callees.tokenizer.calls) > before:
            break
        await asyncio.sleep(0.1)
    (method, metadata), *_ = callees.tokenizer.calls[before:]
    assert method == TOKENIZE
    no_api_key_in(callees.tokenizer)
    body = assertion_of(callees.env, metadata, "ingest", "tokenizer")
    assert (body["sub"], body["tenant"], body["roles"]) == (f"bus:{INGEST_REQUESTED}", "globex", ["service"])


async def test_inference_receives_an_assertion_never_the_callers_key(callees: Callees) -> None:
    async with grpc.aio.insecure_channel(callees.env["LLMOS_RETRIEVAL_ADDR"]) as channel:
        await retrieval_pb2_grpc.RetrievalServiceStub(channel).Search(
            retrieval_pb2.SearchRequest(query="opening hours"), metadata=(("authorization", "Bearer user-key-acme"),), timeout=30)
    calls = [metadata for method, metadata in callees.inference.calls if method == EMBED]
    assert calls, callees.inference.calls
    no_api_key_in(callees.inference)
    body = assertion_of(callees.env, calls[-1], "retrieval", "inference")
    assert (body["sub"], body["tenant"], body["roles"]) == ("alice", "acme", ["user"])
