"""A rolling restart of every service of the cluster (issue 16, item 3) while a client chats and
documents flow through ingest -> embed -> index, on real processes (tests.cluster_stack: three
nats-servers, streams at R3, two replicas of each stateless service, one audit, one retrieval).

Each replica in turn gets SIGTERM (graceful: NOT_SERVING, gRPC drained for
LLMOS_SHUTDOWN_GRACE_S, bus handlers finished, exit 0), is started again on its port and home,
and the next one is restarted once it answers SERVING. Meanwhile a client chats (DialogueService
Chat turns one after another, each a new session, through the list of both dialogue replicas
with round_robin, each with a deadline) and documents are published at a steady pace.

What the restarts may cost, and what the test accepts:
- a text turn calls dialogue, inference (Embed; Generate too with LLMOS_DIALOGUE_DRAFTS, off by
  default and here) and retrieval (Search) (services.dialogue.core.chat); tokenizer, ingest,
  speech and audit are not on its path, so no turn may fail while they restart;
- dialogue and inference have two replicas: new calls go to the other one while a replica stops
  (its server refuses them and gRPC sends them to the other address), so a turn may fail only if
  it was in flight when the replica got SIGTERM and its call there was cut at the end of the
  grace: the turn began before the signal and failed by the time the replica had exited
  (plus RELAY_S for the failure to come back through dialogue);
- retrieval runs once (the embedded index): between its SIGTERM and its SERVING again Search has
  nowhere to go, nor until dialogue dials it again (its reconnect back-off: RECONNECT_S), so a
  turn that overlaps that window may fail; its indexing pauses meanwhile (chunks wait on its
  durable consumer) and resumes;
- audit runs once (one SQLite chain): its restart costs no turn; events published meanwhile wait
  in the AUDIT stream and are stored when it is back (checked below);
- beside the chat, GENERATORS clients stream short generations (InferenceService Generate) to
  see inference drain: a stream in flight on a replica that gets SIGTERM is shorter than the
  grace and must finish; one may fail only if it was cut at the end of the grace (in flight at
  the signal, failed no earlier than the grace after it);
- a failed turn or stream ends UNAVAILABLE: a replica that went away, or the only retrieval down, is what
  UNAVAILABLE means, and it is what a client may retry. DEADLINE_EXCEEDED would be a turn that
  hung on a stopping replica instead of being refused or cut: not accepted, nor is any other code.

Documents: every one indexed exactly once (the docs.indexed events the DOCS stream kept, per
document) and readable from retrieval once it is back. The audit chain verifies, gap-free,
against the checkpoint taken before the restarts, and holds every audit event published since,
among them each document's submission and each answered turn (tests.cluster_audit).

Run alone with `pytest -m cluster`; it prints its figures (-s to see them).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import pytest
from nats.aio.client import Client

from llmos.bus.subjects import DOCS_INDEXED
from llmos.clients import DialogueClient, InferenceClient, RetrievalClient
from llmos.errors import LlmosError, NotFound
from llmos.grpcutil.client import RECONNECT_BACKOFF_MS, open_channel
from llmos.grpcutil.status import status_for
from llmos.settings import PlatformSettings
from llmos.v1 import dialogue_pb2, events_pb2, inference_pb2
from tests.cluster_audit import AuditTrail
from tests.cluster_stack import ClusterStack, Replica, cluster_stack
from tests.conftest import TEST_API_KEY
from tests.integration.test_cluster_faults import TENANT, Publishes, document, publish_document, stored_per_document

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

DOCUMENTS = int(os.environ.get("LLMOS_TEST_ROLLING_DOCUMENTS", "300"))
DOCUMENT_PREFIX = "rolling"
# Documents are published at this pace while the restarts go on, the rest at once after them.
PUBLISH_INTERVAL_S = 0.6
TURN_DEADLINE_S = 30.0
# A client that got UNAVAILABLE waits this long before its next turn.
RETRY_PAUSE_S = 0.2
# The failure of a call cut at the end of a replica's grace reaches the client through dialogue within this.
RELAY_S = 3.0
# A client dials a replica that is back within its longest reconnect back-off, jittered by up to 20 %.
RECONNECT_S = RECONNECT_BACKOFF_MS[1] / 1000 * 1.2
# gRPC's grace (LLMOS_SHUTDOWN_GRACE_S, 5 s) + the bus handlers' (FastStream's 15 s) + closing.
STOP_TIMEOUT_S = 40.0
# After a replica is SERVING and before the next one stops, as a Deployment's minReadySeconds:
# its clients dial it again within RECONNECT_S.
SETTLE_S = 2.0
START_TIMEOUT_S = 120.0
PIPELINE_TIMEOUT_S = 120.0
# What a text turn calls (services.dialogue.core.chat).
TURN_PATH = frozenset({"dialogue", "inference", "retrieval"})
GENERATORS = 2
GENERATE_TOKENS = 24  # a second or two here: well inside the grace
SHUTDOWN_GRACE_S = PlatformSettings.model_fields["shutdown_grace_s"].default
QUESTION = "Does the cluster keep every document it was given? (question {number})"


@pytest.fixture(scope="module")
def stack(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    with cluster_stack(tmp_path_factory.mktemp("cluster"), models_home) as running:
        yield running


@dataclass
class Restart:
    replica: Replica
    alone: bool  # the only replica of its service
    signalled: float
    exited: float = 0.0
    serving: float = 0.0
    exit_code: int | None = None

    @property
    def stop_s(self) -> float:
        return self.exited - self.signalled

    @property
    def start_s(self) -> float:
        return self.serving - self.exited


@dataclass
class Turn:
    number: int
    started: float
    ended: float = 0.0
    code: str = ""  # OK, or the gRPC status it failed with
    detail: str = ""
    session_id: str = ""
    answer: str = ""
    path: str = ""

    def excused_by(self, restart: Restart) -> bool:
        """Whether `restart` may have failed this turn (see the module's docstring)."""
        if restart.replica.service not in TURN_PATH:
            return False
        if restart.alone:
            return self.started <= restart.serving + RECONNECT_S and self.ended >= restart.signalled
        return self.started <= restart.signalled <= self.ended <= restart.exited + RELAY_S


@dataclass
class Generation:
    started: float
    ended: float = 0.0
    code: str = ""
    deltas: int = 0

    def in_flight_at(self, moment: float) -> bool:
        return self.started <= moment <= self.ended

    def excused_by(self, restart: Restart) -> bool:
        """Cut at the end of its inference replica's grace (see the module's docstring)."""
        return (
            restart.replica.service == "inference" and self.in_flight_at(restart.signalled)
            and restart.signalled + SHUTDOWN_GRACE_S - 0.5 <= self.ended <= restart.exited + 1.0
        )


def wire_status(error: LlmosError) -> str:
    """The gRPC status the call failed with: the typed clients map UNKNOWN and INTERNAL to
    Unavailable (llmos.grpcutil.status.error_from_rpc), so the status is read from the call's
    own error where there is one."""
    cause = error.__context__
    if isinstance(cause, grpc.aio.AioRpcError):
        return cause.code().name
    return status_for(error).name


async def chat(client: DialogueClient, turns: list[Turn], stop: asyncio.Event) -> None:
    """Turns one after another until `stop`, each in a new session."""
    while not stop.is_set():
        turn = Turn(len(turns), time.monotonic())
        turns.append(turn)
        request = dialogue_pb2.ChatRequest(message=QUESTION.format(number=turn.number), user_id="alice")
        answer = []
        try:
            async for response in client.chat(request, TURN_DEADLINE_S):
                turn.session_id = response.session_id or turn.session_id
                answer.append(response.delta)
                if response.final:
                    turn.path = dialogue_pb2.AnswerPath.Name(response.grounding.path).removeprefix("ANSWER_PATH_")
            turn.code, turn.answer = "OK", "".join(answer)
        except LlmosError as exc:
            turn.code, turn.detail = wire_status(exc), exc.message
        turn.ended = time.monotonic()
        if turn.code != "OK":
            await asyncio.sleep(RETRY_PAUSE_S)


async def generate(client: InferenceClient, generations: list[Generation], stop: asyncio.Event) -> None:
    """Short generations one after another until `stop`."""
    request = inference_pb2.GenerateRequest(
        prompt="Count: 1, 2, 3,", sampling=inference_pb2.SamplingParams(max_new_tokens=GENERATE_TOKENS)
    )
    while not stop.is_set():
        generation = Generation(time.monotonic())
        generations.append(generation)
        try:
            async for response in client.generate(request, timeout_s=TURN_DEADLINE_S):
                generation.deltas += 1
                if response.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
                    generation.code = "OK"
            generation.code = generation.code or "ENDED_UNFINISHED"
        except LlmosError as exc:
            generation.code = wire_status(exc)
        generation.ended = time.monotonic()
        if generation.code != "OK":
            await asyncio.sleep(RETRY_PAUSE_S)


async def publish(connection: Client, restarts_done: asyncio.Event) -> tuple[float, int]:
    """DOCUMENTS documents, one per PUBLISH_INTERVAL_S while the restarts go on, the rest at once.
    Returns when the paced part ended and how many publishes were retried."""
    retried, paced_until = 0, 0.0
    for number in range(DOCUMENTS):
        retried += await publish_document(connection, document(number, DOCUMENT_PREFIX))
        if not restarts_done.is_set():
            paced_until = time.monotonic()
            await asyncio.sleep(PUBLISH_INTERVAL_S)
    return paced_until, retried


async def restart(stack: ClusterStack, replica: Replica) -> Restart:
    """SIGTERM, wait for the exit, start again on the same port and home, wait for SERVING; the
    waits in threads so the chat and the publisher go on."""
    process = replica.process
    assert process is not None and process.poll() is None, f"{replica.name} is not running"
    done = Restart(replica, len(stack.of(replica.service)) == 1, time.monotonic())
    process.send_signal(signal.SIGTERM)
    try:
        done.exit_code = await asyncio.to_thread(process.wait, STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"{replica.name} still running {STOP_TIMEOUT_S:.0f} s after SIGTERM") from None
    done.exited = time.monotonic()
    stack.start(replica)
    await asyncio.to_thread(stack.wait_serving, [replica], START_TIMEOUT_S)
    done.serving = time.monotonic()
    await asyncio.sleep(SETTLE_S)
    return done


async def warm_up(client: DialogueClient) -> None:
    """Turns until both dialogue replicas have answered, so round_robin balances over both."""
    for number in range(4):
        request = dialogue_pb2.ChatRequest(message=QUESTION.format(number=-1 - number), user_id="alice")
        async for _ in client.chat(request, 120):
            pass


@pytest.mark.timeout(540)
async def test_a_rolling_restart_of_every_service_loses_no_document_and_fails_only_turns_it_cuts(stack: ClusterStack) -> None:
    observer = await nats.connect(stack.nats.urls, **stack.admin_connect_options())
    publisher = await nats.connect(stack.nats.urls, **stack.admin_connect_options())
    dialogue_channel = open_channel(stack.addr("dialogue"), TEST_API_KEY)
    retrieval_channel = open_channel(stack.addr("retrieval"), TEST_API_KEY)
    inference_channel = open_channel(stack.addr("inference"), TEST_API_KEY)
    dialogue = DialogueClient(dialogue_channel)
    inference = InferenceClient(inference_channel)
    try:
        await warm_up(dialogue)
        trail = await AuditTrail.begin(stack, TENANT)
        docs_seq = (await observer.jetstream().stream_info("DOCS")).state.last_seq
        indexed = Publishes(events_pb2.DocumentIndexed)
        await indexed.subscribe(observer, DOCS_INDEXED)

        turns: list[Turn] = []
        generations: list[Generation] = []
        restarts: list[Restart] = []
        chatting, restarts_done = asyncio.Event(), asyncio.Event()
        started = time.monotonic()
        chat_task = asyncio.create_task(chat(dialogue, turns, chatting))
        generating = [asyncio.create_task(generate(inference, generations, chatting)) for _ in range(GENERATORS)]
        publishing = asyncio.create_task(publish(publisher, restarts_done))
        try:
            for replica in list(stack.replicas):
                restarts.append(await restart(stack, replica))
                assert not chat_task.done() and not any(task.done() for task in generating)
                assert not (publishing.done() and publishing.exception())
        finally:
            restarts_done.set()
            chatting.set()
            await asyncio.wait_for(asyncio.gather(chat_task, *generating), TURN_DEADLINE_S + 5)
        rolled_s = time.monotonic() - started
        paced_until, retried = await asyncio.wait_for(publishing, 60)

        # Bounded; a document missing then is reported with the figures below.
        deadline = time.monotonic() + PIPELINE_TIMEOUT_S
        while len(indexed.per_document) < DOCUMENTS and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        pipeline_s = time.monotonic() - started
        await asyncio.sleep(1.0)  # late repeats of a redelivery still count
        stored = await stored_per_document(observer, DOCS_INDEXED, events_pb2.DocumentIndexed, docs_seq)

        # Readable after retrieval's restart: its index kept what it had indexed before.
        retrieval = RetrievalClient(retrieval_channel)
        unreadable = []
        for document_id in sorted(stored):
            try:
                _, text = await retrieval.document(TENANT, document_id, 30)
            except NotFound:
                text = ""
            if f"Document {document_id.removeprefix(DOCUMENT_PREFIX + '-')}." not in text:
                unreadable.append(document_id)

        answered = [turn for turn in turns if turn.code == "OK"]
        expected_audit = [("ingest/submit", f"document/{DOCUMENT_PREFIX}-{number}") for number in range(DOCUMENTS)]
        expected_audit += [("dialogue/chat", f"session/{turn.session_id}") for turn in answered]
    finally:
        await observer.close()
        await publisher.close()
        await dialogue_channel.close()
        await retrieval_channel.close()
        await inference_channel.close()

    failed = [turn for turn in turns if turn.code != "OK"]
    unexcused = [turn for turn in failed if not any(turn.excused_by(done) for done in restarts)]
    cut = [generation for generation in generations if generation.code != "OK"]
    cut_unexcused = [generation for generation in cut if not any(generation.excused_by(done) for done in restarts)]
    print(f"\nrolling restart of {len(restarts)} replicas in {rolled_s:.1f} s (documents paced for {paced_until - started:.1f} s):")
    for done in restarts:
        during = [turn for turn in turns if turn.started <= done.serving and turn.ended >= done.signalled]
        print(
            f"  {done.replica.name}: stopped in {done.stop_s:.1f} s (exit {done.exit_code}), SERVING {done.start_s:.1f} s later; "
            f"turns overlapping {len(during)}, failed {sum(1 for turn in during if turn.code != 'OK')}; "
            f"documents indexed meanwhile {sum(1 for at in indexed.first_at.values() if done.signalled <= at <= done.serving)}"
        )
        if done.replica.service == "inference":
            draining = [generation for generation in generations if generation.in_flight_at(done.signalled)]
            print(f"    generations in flight at its SIGTERM {len(draining)}, finished {sum(1 for g in draining if g.code == 'OK')}")
    durations = sorted(turn.ended - turn.started for turn in answered)
    print(
        f"{DOCUMENTS} documents in, {len(stored)} indexed ({sum(stored.values())} docs.indexed kept, "
        f"{indexed.repeats} repeats published) in {pipeline_s:.1f} s, {len(unreadable)} unreadable; publishes retried {retried}\n"
        f"{len(turns)} turns: {len(answered)} answered ({dict(Counter(turn.path for turn in answered))}; "
        f"median {durations[len(durations) // 2] if durations else 0:.2f} s, max {durations[-1] if durations else 0:.2f} s), "
        f"{len(failed)} failed {dict(Counter(turn.code for turn in failed))}, {len(unexcused)} outside a restart that could cut them\n"
        f"{len(generations)} generations of {GENERATE_TOKENS} tokens: {len(generations) - len(cut)} finished, "
        f"{len(cut)} failed {dict(Counter(generation.code for generation in cut))}, {len(cut_unexcused)} not cut at the end of a grace"
    )
    for turn in failed[:20]:
        print(f"  turn {turn.number} {turn.started - started:.1f}-{turn.ended - started:.1f} s: {turn.code} {turn.detail[:120]}")
    print(await trail.check(expected_audit))

    assert all(done.exit_code == 0 for done in restarts), [(done.replica.name, done.exit_code) for done in restarts]
    assert set(stored) == {f"{DOCUMENT_PREFIX}-{number}" for number in range(DOCUMENTS)}
    assert all(count == 1 for count in stored.values()), {doc: count for doc, count in stored.items() if count > 1}
    assert not unreadable, unreadable
    assert answered and all(turn.answer for turn in answered)
    assert all(turn.code == "UNAVAILABLE" for turn in failed), [(turn.number, turn.code, turn.detail) for turn in failed]
    assert not unexcused, [(turn.number, turn.started - started, turn.ended - started, turn.detail) for turn in unexcused]
    assert all(generation.code == "UNAVAILABLE" for generation in cut), [generation.code for generation in cut]
    assert not cut_unexcused, [(generation.started - started, generation.ended - started) for generation in cut_unexcused]
    # The drain was seen: streams were in flight when each inference replica got SIGTERM.
    assert all(
        any(generation.in_flight_at(done.signalled) for generation in generations)
        for done in restarts if done.replica.service == "inference"
    )
