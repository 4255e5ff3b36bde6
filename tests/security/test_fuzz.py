"""Fuzzing: adversarial payloads on every consumed subject and adversarial requests on every RPC,
as every principal; then the platform must still work.

- Bus: per subject, random bytes, 1 MB payloads, messages of the subject's type (and of the wrong
  one) with adversarial values (`fuzz_values`), invalid UTF-8, groups nested deep, cut messages.
  Afterwards a canary message on each subject must be processed end to end (its effect seen, every
  durable consumer of the subject past it, nothing dead-lettered): a dead consumer fails.
- RPCs: per RPC, requests with adversarial values and raw-bytes variants, streaming RPCs with
  up to thousands of messages, cycling through every principal and unauthenticated callers. Each
  answer must be a deliberate status: success, a domain error, a refusal or a quota; INTERNAL,
  UNKNOWN, UNAVAILABLE fail, and so does a call that only ends by its deadline. Afterwards the
  canary call of every RPC (`rpc_calls.canary`) must answer as it should.

Knobs: LLMOS_FUZZ_CASES is the number of cases per RPC and per subject (200, the default, is the
CI run; 2000 a long one); LLMOS_FUZZ_SEED picks other cases (the seed of a failing run is printed);
LLMOS_FUZZ_DEADLINE_S is the deadline of each fuzz call (60 s).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import nats
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from llmos.bus.subjects import (
    AUDIT_ALL,
    CHUNKS_CREATED,
    CHUNKS_EMBEDDED,
    DOCS_DELETED,
    DOCS_INDEXED,
    INGEST_REQUESTED,
    audit_subject,
    dead_letter_subject,
    ingest_requested,
    stream_for,
)
from llmos.policy import RPC_PERMISSIONS, permissions_of
from llmos.v1 import audit_pb2, common_pb2, events_pb2, inference_pb2, ingest_pb2, retrieval_pb2
from tests.conftest import TEST_API_KEY, RunningStack
from tests.security.fuzz_values import Values
from tests.security.rpc_calls import (
    ANSWERED,
    CALLERS,
    CLIENT_RACE,
    PRINCIPAL_OF,
    Caller,
    CanaryDocument,
    CanaryState,
    Outcome,
    all_rpcs,
    canary,
    fuzz_cases,
    path,
    seed_canary_documents,
    tenant_fields,
)

pytestmark = pytest.mark.security

SEED = int(os.environ.get("LLMOS_FUZZ_SEED", "15"))
CASES_PER_RPC = fuzz_cases()
CASES_PER_SUBJECT = fuzz_cases()
DEADLINE_S = float(os.environ.get("LLMOS_FUZZ_DEADLINE_S", "60"))
CONCURRENT_CALLS = 4
MAX_FINDINGS = 10
# Who calls: every principal of the stack, and two callers without a valid key.
FUZZ_KEYS: tuple[str | None, ...] = (*CALLERS.values(), None, "not-a-key")
# Tenants the bus cases name. acme and globex are left out: their indexes serve the rest of the
# suite's tests, which random chunks would disturb (tenant isolation has its own tests).
BUS_TENANTS = ("fuzz", "fuzz-b", "", "ACME", "acme/eu", "fuzz.x", "*", "x" * 64)
CANARY_TENANT = "canary-bus"


def expected_for(method: MethodDescriptor, key: str | None) -> set[grpc.StatusCode]:
    """The statuses a call of `method` by the holder of `key` may end with."""
    principal = PRINCIPAL_OF.get(key) if key else None
    # RESOURCE_EXHAUSTED for anyone: a request over the server's message size is refused before
    # it is read, and a principal over a quota.
    if principal is None:
        return {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    if RPC_PERMISSIONS[path(method)] not in permissions_of(principal):
        return {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    # Allowed: served, or refused for what the request asks (another tenant, another user's session).
    return ANSWERED | {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}


SYNTHESIS_MAX_CHARS = 5000  # services/speech/settings.py: longer texts are refused, cheaply


def bounded_cost(method: MethodDescriptor, request: Message) -> Message:
    """Hold the one knob that makes a valid request arbitrarily slow to a cheap value: hundreds of
    generations of the default 256 tokens would take the run past its minutes. Values out of the
    allowed range are kept: refusing them is under test."""
    if method.name == "Generate" and 0 <= request.sampling.max_new_tokens <= 1024:  # type: ignore[attr-defined]
        request.sampling.max_new_tokens = 1 + request.sampling.max_new_tokens % 4  # type: ignore[attr-defined]
    if method.name in {"Synthesize", "SynthesizeStream"} and len(request.text) <= SYNTHESIS_MAX_CHARS:  # type: ignore[attr-defined]
        # Kokoro spells an unknown script letter by letter: 60 such characters took 30 s here.
        request.text = request.text[:12]  # type: ignore[attr-defined]
    return request


def audio_stream(values: Values, method: MethodDescriptor, first: Message) -> tuple[str, list[Message | bytes]]:
    """A client stream: the first message (usually a config), then up to thousands of audio messages."""
    request_type = type(first)
    audio_field = next(f.name for f in first.DESCRIPTOR.fields if f.type == f.TYPE_BYTES)
    count = values.rng.choice((0, 1, 20, 200, 2000))
    # Many messages are tiny: the stream is long in messages, not in seconds of audio to recognize.
    size = values.rng.choice((0, 1, 2, 3, 64)) if count >= 200 else values.rng.choice((0, 1, 3, 3200, 32000))
    loud = values.chance(0.3)
    chunk = values.rng.randbytes(size) if loud else bytes(size)
    messages: list[Message | bytes] = [first, *(request_type(**{audio_field: chunk}) for _ in range(count))]
    extra = ""
    if count and values.chance(0.2):
        index = values.rng.randint(1, count)
        messages.insert(index, values.message(first.DESCRIPTOR))
        extra = f", another random message at {index}"
    if count and values.chance(0.1):
        messages.append(request_type(**{audio_field: values.rng.randbytes(1024 * 1024)}))
        extra += ", a 1 MB chunk last"
    return f"{count} audio messages of {size} bytes ({'noise' if loud else 'silence'}){extra}", messages


def rpc_case(values: Values, method: MethodDescriptor) -> tuple[str, Any]:
    """A description of the case and what to send: a message, raw bytes, or a list for a client stream."""
    request = bounded_cost(method, values.message(method.input_type))
    for message, name in tenant_fields(request):
        if values.chance(0.7):
            # Mostly the caller's own tenant, so that the rest of the request is read at all.
            message.ClearField(name)
    raw = values.chance(0.15)
    description = "random values"
    first: Message | bytes = request
    if raw:
        what, first = values.wire_variant(request)
        description = f"raw bytes: {what}"
    if not method.client_streaming:
        return description, first
    if isinstance(first, Message) and values.chance(0.7):
        # Mostly a config first, so that the audio that follows is read at all.
        config_field = next(f for f in request.DESCRIPTOR.fields if f.message_type is not None)
        config = request.__class__()
        getattr(config, config_field.name).CopyFrom(values.message(config_field.message_type))
        first = config
    streamed, messages = audio_stream(values, method, request.__class__())
    messages[0] = first
    return f"{description}; {streamed}", messages


@dataclass
class Finding:
    rpc: str
    caller: str
    case: str
    outcome: Outcome

    def __str__(self) -> str:
        return f"{self.rpc} as {self.caller}: {self.case}: {self.outcome}"


@pytest.fixture(scope="module")
async def canary_documents(stack: RunningStack) -> dict[str, CanaryDocument]:
    async with Caller(stack) as caller:
        return await seed_canary_documents(caller, ("acme",))


@pytest.mark.timeout(3600)
async def test_adversarial_requests_on_every_rpc(stack: RunningStack, canary_documents: dict[str, CanaryDocument]) -> None:
    findings: list[Finding] = []
    unresolved_races: list[str] = []
    statuses: Counter[str] = Counter()
    submitted: set[tuple[str, str]] = set()  # (tenant, document id) written by the fuzz, deleted after it
    slowest: tuple[float, str] = (0.0, "")
    gate = asyncio.Semaphore(CONCURRENT_CALLS)
    started = time.perf_counter()
    async with Caller(stack) as caller:

        async def run(service: str, method: MethodDescriptor, index: int, values: Values) -> None:
            nonlocal slowest
            key = FUZZ_KEYS[index % len(FUZZ_KEYS)]
            case, requests = rpc_case(values, method)
            async with gate:
                if len(findings) >= MAX_FINDINGS:
                    return  # enough to act on: a broken service would otherwise cost a deadline per case
                outcome = await caller.call(service, method, key, requests, timeout_s=DEADLINE_S)
            statuses[outcome.status.name] += 1
            caller_name = PRINCIPAL_OF[key].subject if key in PRINCIPAL_OF else repr(key)
            slowest = max(slowest, (outcome.seconds, f"{method.name} as {caller_name}: {case}"))
            if CLIENT_RACE[1] in outcome.details:
                # grpc/grpc#36066 again on the retry with the first message alone (the server refused
                # before it was sent), or inside the platform: Converse relaying speech's refusal of its
                # recognition stream. Counted and printed, not a finding: the canaries below still check
                # that every service answers.
                unresolved_races.append(f"{method.name} as {caller_name}: {outcome}")
            elif outcome.status not in expected_for(method, key):
                findings.append(Finding(method.name, caller_name, f"case {index}, {case}", outcome))
            if method.name == "SubmitDocument" and outcome.status == grpc.StatusCode.OK and isinstance(requests, Message):
                submitted.add((requests.tenant or PRINCIPAL_OF[key].tenant, requests.document_id))  # type: ignore[attr-defined]

        seconds: dict[str, float] = {}
        for number, (service, method) in enumerate(all_rpcs()):
            values = Values(SEED * 1000 + number)
            rpc_started = time.perf_counter()
            await asyncio.gather(*(run(service, method, index, values) for index in range(CASES_PER_RPC)))
            seconds[method.name] = round(time.perf_counter() - rpc_started, 1)
        fuzz_s = time.perf_counter() - started

        delete = next(method for _, method in all_rpcs() if method.name == "DeleteDocument")
        for tenant, document_id in submitted:
            await caller.call("ingest", delete, TEST_API_KEY, ingest_pb2.DeleteDocumentRequest(tenant=tenant, document_id=document_id))

        # Afterwards every RPC still answers its canary call, and answers it right.
        broken: list[str] = []
        state = CanaryState(canary_documents["acme"])
        for service, method in all_rpcs():
            probe = canary(method, state)
            outcome = await caller.call(service, method, TEST_API_KEY, probe.requests, timeout_s=DEADLINE_S)
            try:
                assert outcome.status == grpc.StatusCode.OK, str(outcome)
                probe.check(outcome.responses)
            except AssertionError as error:
                broken.append(f"{method.name}: {error}")
    total = sum(statuses.values())
    print(f"rpc fuzz (seed {SEED}): {total} calls, {CASES_PER_RPC} per RPC over {len(all_rpcs())} RPCs and "
          f"{len(FUZZ_KEYS)} callers in {fuzz_s:.0f} s: {dict(statuses)}; slowest {slowest[0]:.1f} s ({slowest[1][:200]}); "
          f"{len(submitted)} fuzz documents deleted; {caller.client_races} client streams asked again with their first message "
          f"(grpc/grpc#36066), {len(unresolved_races)} still cut short by it {unresolved_races[:5]}; seconds per RPC: {seconds}")
    assert not findings, f"{len(findings)} answers were not deliberate (seed {SEED}):\n" + "\n".join(str(f)[:600] for f in findings[:25])
    assert not broken, "after fuzzing, canary calls failed:\n" + "\n".join(broken)


# The bus.

# Each consumed subject (a tenant's publishing subject and an audit subject stand for their wildcards)
# with the message type its consumers read.
CONSUMED: dict[str, type[Message]] = {
    INGEST_REQUESTED: events_pb2.DocumentSubmitted,
    ingest_requested("fuzz"): events_pb2.DocumentSubmitted,
    CHUNKS_CREATED: events_pb2.ChunksCreated,
    CHUNKS_EMBEDDED: events_pb2.ChunksEmbedded,
    DOCS_INDEXED: events_pb2.DocumentIndexed,
    DOCS_DELETED: events_pb2.DocumentDeleted,
    audit_subject("fuzz"): events_pb2.AuditEvent,
}


def bus_case(values: Values, subject: str, message_type: type[Message]) -> tuple[str, str, bytes]:
    """(description, subject, payload) of one adversarial message meant for `subject`."""
    roll = values.rng.random()
    if subject.startswith(INGEST_REQUESTED + ".") and values.chance(0.3):
        subject = f"{INGEST_REQUESTED}.{values.rng.choice(('fuzz-b', 'ACME', '%', '-', 'x' * 200))}"
    if roll < 0.15:
        return "random bytes", subject, values.rng.randbytes(values.rng.randint(0, 512))
    if roll < 0.2:
        return "1 MB of random bytes", subject, values.rng.randbytes(1024 * 1024)
    if roll < 0.25:
        other = values.rng.choice(sorted({t for t in CONSUMED.values() if t is not message_type}, key=lambda t: t.DESCRIPTOR.name))
        return f"a {other.DESCRIPTOR.name} instead", subject, values.message(other.DESCRIPTOR).SerializeToString()
    message = values.message(message_type.DESCRIPTOR)
    for name in ("tenant",):
        if name in message.DESCRIPTOR.fields_by_name and values.chance(0.8):
            setattr(message, name, values.rng.choice(BUS_TENANTS))
    _retenant(message, values)
    if roll < 0.4:
        what, payload = values.wire_variant(message)
        return f"raw bytes: {what}", subject, payload
    return "random values", subject, message.SerializeToString()


def _retenant(message: Message, values: Values) -> None:
    """Nested tenant fields (a chunk's) also name only the fuzz's tenants."""
    for field in message.DESCRIPTOR.fields:
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        children = getattr(message, field.name) if field.is_repeated else [getattr(message, field.name)]
        for child in children[:10]:
            if "tenant" in child.DESCRIPTOR.fields_by_name and child.tenant in ("acme", "globex"):
                child.tenant = values.rng.choice(BUS_TENANTS)
            _retenant(child, values)
        if field.is_repeated and len(children) > 10:
            # Copies of one entry: the first stands for all.
            for child in children[10:]:
                child.CopyFrom(children[0])


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` the rest."""
    tokens, wanted = subject.split("."), pattern.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


async def consumers_past(js: JetStreamContext, subject: str, sequence: int, timeout_s: float) -> list[str]:
    """Wait until every durable consumer of `subject` has acknowledged everything up to `sequence`;
    those that did not within `timeout_s`, with where they are."""
    deadline = time.monotonic() + timeout_s
    while True:
        behind = []
        for info in await js.consumers_info(stream_for(subject).name):
            config = info.config
            filters = [config.filter_subject] if config.filter_subject else list(config.filter_subjects or [])
            if config.durable_name and any(matches(f, subject) for f in filters) and info.ack_floor.stream_seq < sequence:
                behind.append(f"{config.durable_name} at {info.ack_floor.stream_seq} (pending {info.num_pending}, "
                              f"unacknowledged {info.num_ack_pending}, redelivered {info.num_redelivered})")
        if not behind or time.monotonic() > deadline:
            return behind
        await asyncio.sleep(0.2)


async def dead_letters_since(js: JetStreamContext, after_seq: int) -> list[events_pb2.DeadLetter]:
    stream = stream_for(dead_letter_subject(INGEST_REQUESTED)).name
    letters = []
    sequence = after_seq
    while True:
        try:
            message = await js.get_msg(stream, sequence + 1, next=True)
        except NotFoundError:
            return letters
        sequence = message.seq
        letters.append(events_pb2.DeadLetter.FromString(message.data))


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return False


@pytest.mark.timeout(3600)
async def test_adversarial_messages_on_every_consumed_subject(stack: RunningStack) -> None:
    connection = await nats.connect(stack.settings.nats_url, max_reconnect_attempts=-1)
    js = connection.jetstream()
    published: Counter[str] = Counter()
    refused: Counter[str] = Counter()  # payloads the stream itself turned away (e.g. over AUDIT's size limit)
    started = time.perf_counter()
    try:
        for number, (subject, message_type) in enumerate(CONSUMED.items()):
            values = Values(SEED * 1000 + 100 + number)
            for _ in range(CASES_PER_SUBJECT):
                _, target, payload = bus_case(values, subject, message_type)
                headers = {"Nats-Msg-Id": uuid.uuid4().hex} if values.chance(0.5) else None
                try:
                    await js.publish(target, payload, headers=headers, timeout=10)
                    published[subject] += 1
                except APIError as error:
                    assert "maximum" in str(error).lower() or "size" in str(error).lower(), f"{subject}: {error}"
                    refused[subject] += 1
        fuzz_s = time.perf_counter() - started
        dlq_before = (await js.stream_info(stream_for(dead_letter_subject(INGEST_REQUESTED)).name)).state.last_seq
        problems = await bus_canaries(stack, js)
        letters = await dead_letters_since(js, dlq_before)
    finally:
        await connection.close()
    canary_letters = [letter for letter in letters if CANARY_TENANT.encode() in letter.payload]
    print(f"bus fuzz (seed {SEED}): {sum(published.values())} messages published in {fuzz_s:.0f} s, {CASES_PER_SUBJECT} "
          f"per subject over {len(CONSUMED)} subjects: {dict(published)}; refused by the stream: {dict(refused)}; "
          f"{len(letters)} dead letters while the canaries ran")
    assert not problems, "after fuzzing the bus:\n" + "\n".join(problems)
    assert not canary_letters, f"canaries dead-lettered: {[(l.subject, l.error) for l in canary_letters]}"


async def bus_canaries(stack: RunningStack, js: JetStreamContext) -> list[str]:
    """Publish a canary on every consumed subject and check each is processed end to end; the problems."""
    problems: list[str] = []
    word = f"zq{uuid.uuid4().hex[:8]}"
    async with Caller(stack) as caller:
        methods = {method.name: (service, method) for service, method in all_rpcs()}

        async def call(name: str, request: Message) -> Outcome:
            service, method = methods[name]
            return await caller.call(service, method, TEST_API_KEY, request)

        async def stage_of(document_id: str) -> int:
            outcome = await call("GetDocumentStatus", ingest_pb2.GetDocumentStatusRequest(tenant=CANARY_TENANT, document_id=document_id))
            return outcome.responses[0].stage if outcome.status == grpc.StatusCode.OK else -1

        async def searchable(document_id: str) -> bool:
            outcome = await call("GetDocument", retrieval_pb2.GetDocumentRequest(tenant=CANARY_TENANT, document_id=document_id))
            return outcome.status == grpc.StatusCode.OK and any(word in chunk.text for chunk in outcome.responses[0].chunks)

        async def gone(document_id: str) -> bool:
            outcome = await call("GetDocument", retrieval_pb2.GetDocumentRequest(tenant=CANARY_TENANT, document_id=document_id))
            return outcome.status == grpc.StatusCode.NOT_FOUND

        async def publish(subject: str, message: Message) -> int:
            ack = await js.publish(subject, message.SerializeToString(), headers={"Nats-Msg-Id": uuid.uuid4().hex}, timeout=10)
            return int(ack.seq)

        async def processed(subject: str, sequence: int) -> None:
            behind = await consumers_past(js, subject, sequence, timeout_s=120)
            if behind:
                problems.append(f"{subject}: consumers never got past the canary (sequence {sequence}): {behind}")

        text = f"Canary sent over the bus. The {word} code is printed on the receipt. It is checked at the till."
        # llmos.ingest.requested (the admin's subject) and a tenant's subject, in both lanes: indexed end to end.
        submitted = {}
        for subject, priority in ((INGEST_REQUESTED, common_pb2.PRIORITY_INTERACTIVE), (ingest_requested(CANARY_TENANT), common_pb2.PRIORITY_BATCH)):
            document_id = f"bus-canary-{subject.count('.')}-{word}"
            submitted[subject] = document_id
            sequence = await publish(subject, events_pb2.DocumentSubmitted(
                tenant=CANARY_TENANT, document_id=document_id, mime_type="text/plain", content=text.encode(), priority=priority))
            await processed(subject, sequence)
        for subject, document_id in submitted.items():
            if not await eventually(lambda d=document_id: _is_indexed(stage_of, d), 120):
                problems.append(f"{subject}: the canary document {document_id} was never indexed (stage {await stage_of(document_id)})")
            elif not await searchable(document_id):
                problems.append(f"{subject}: the canary document {document_id} is indexed but not readable")

        # llmos.chunks.created: inference embeds the chunk, retrieval indexes it.
        created_id = f"bus-canary-created-{word}"
        chunk = common_pb2.Chunk(chunk_id=f"{created_id}#0", document_id=created_id, tenant=CANARY_TENANT, text=text, token_count=20)
        sequence = await publish(CHUNKS_CREATED, events_pb2.ChunksCreated(
            tenant=CANARY_TENANT, document_id=created_id, content_hash=word, chunks=[chunk]))
        await processed(CHUNKS_CREATED, sequence)
        if not await eventually(lambda: searchable(created_id), 120):
            problems.append(f"{CHUNKS_CREATED}: the canary chunk was never indexed")

        # llmos.chunks.embedded: retrieval indexes the vector it is given.
        embedded_id = f"bus-canary-embedded-{word}"
        embedding = await call("Embed", inference_pb2.EmbedRequest(texts=[text]))
        assert embedding.status == grpc.StatusCode.OK, embedding
        vector = list(embedding.responses[0].embeddings[0].values)
        chunk = common_pb2.Chunk(chunk_id=f"{embedded_id}#0", document_id=embedded_id, tenant=CANARY_TENANT, text=text, token_count=20)
        sequence = await publish(CHUNKS_EMBEDDED, events_pb2.ChunksEmbedded(
            tenant=CANARY_TENANT, document_id=embedded_id, content_hash=word, model=embedding.responses[0].model,
            chunks=[events_pb2.EmbeddedChunk(chunk=chunk, vector=vector)]))
        await processed(CHUNKS_EMBEDDED, sequence)
        if not await eventually(lambda: searchable(embedded_id), 120):
            problems.append(f"{CHUNKS_EMBEDDED}: the canary chunks were never indexed")

        # llmos.docs.indexed: ingest, dialogue and speech each handle it (ingest's status of the
        # document is already INDEXED: the event is a repeat, which must be harmless).
        indexed_id = submitted[INGEST_REQUESTED]
        status = await call("GetDocumentStatus", ingest_pb2.GetDocumentStatusRequest(tenant=CANARY_TENANT, document_id=indexed_id))
        content_hash = status.responses[0].content_hash if status.status == grpc.StatusCode.OK else ""
        sequence = await publish(DOCS_INDEXED, events_pb2.DocumentIndexed(
            tenant=CANARY_TENANT, document_id=indexed_id, content_hash=content_hash, chunk_count=1))
        await processed(DOCS_INDEXED, sequence)

        # llmos.docs.deleted: retrieval drops the document.
        sequence = await publish(DOCS_DELETED, events_pb2.DocumentDeleted(tenant=CANARY_TENANT, document_id=embedded_id))
        await processed(DOCS_DELETED, sequence)
        if not await eventually(lambda: gone(embedded_id), 60):
            problems.append(f"{DOCS_DELETED}: the canary document is still readable")

        # llmos.audit.<service>: stored, and found by a query.
        event_id = uuid.uuid4().hex
        sequence = await publish(audit_subject("fuzz"), events_pb2.AuditEvent(
            event_id=event_id, tenant=CANARY_TENANT, principal="bus-canary", action="fuzz/canary", resource=f"canary/{word}",
            decision=events_pb2.AUDIT_DECISION_ALLOW))
        await processed(AUDIT_ALL.replace(">", "fuzz"), sequence)

        async def audited() -> bool:
            outcome = await call("Query", audit_pb2.QueryAuditRequest(tenant=CANARY_TENANT, principal="bus-canary"))
            return outcome.status == grpc.StatusCode.OK and any(r.event.event_id == event_id for r in outcome.responses)

        if not await eventually(audited, 60):
            problems.append("llmos.audit.fuzz: the canary audit event was never stored")
    return problems


async def _is_indexed(stage_of: Callable[[str], Awaitable[int]], document_id: str) -> bool:
    return await stage_of(document_id) == common_pb2.DOCUMENT_STAGE_INDEXED


async def test_an_oversized_document_id_leaves_ingest_working(stack: RunningStack) -> None:
    """Found by the bus fuzzing: a document whose id is refused as too long was still given a
    failure status under a key holding the id, a subject past NATS's 4 KiB control line, and the
    server closed ingest's connection for good while its health still said SERVING."""
    oversized = "d" * 3000  # hex-encoded in the key: 6000 bytes
    async with Caller(stack) as caller:
        methods = {method.name: (service, method) for service, method in all_rpcs()}
        service, submit = methods["SubmitDocument"]
        refused = await caller.call(service, submit, "operator-key-acme", ingest_pb2.SubmitDocumentRequest(
            document_id=oversized, mime_type="text/plain", content=b"An id far too long."))
        assert refused.status == grpc.StatusCode.INVALID_ARGUMENT and "document_id" in refused.details, refused
        connection = await nats.connect(stack.settings.nats_url)
        try:
            await connection.jetstream().publish(INGEST_REQUESTED, events_pb2.DocumentSubmitted(
                tenant=CANARY_TENANT, document_id=oversized, mime_type="text/plain", content=b"An id far too long.").SerializeToString())
        finally:
            await connection.close()
        # Ingest still reads the bus and writes its statuses: a document goes all the way to INDEXED.
        documents = await seed_canary_documents(caller, (CANARY_TENANT,))
        assert documents[CANARY_TENANT].document_id
