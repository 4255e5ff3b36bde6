"""Users and sessions inside a tenant are bound to the caller (issue 13, item 6).

Two users of one tenant: the second, holding the first's session id (audit records carry it) or
naming the first's user id, can neither read, continue nor end the session, nor read or poison
the first's reading profile. Users act as themselves; an operator of the tenant may act for
them. Against the real stack, with a second user's key issued the way `llmos keys` issues it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable

import grpc
import nats
import pytest

from llmos.keys import KeyStore
from llmos.v1 import (
    common_pb2,
    dialogue_pb2,
    dialogue_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from tests.conftest import RunningStack
from tests.grpc_helpers import ACME_OPERATOR, ACME_USER, ADMIN

pytestmark = pytest.mark.security

Metadata = tuple[tuple[str, str], ...]
ALICE = ACME_USER
OPERATOR = ACME_OPERATOR


@pytest.fixture(scope="module")
async def mallory(stack: RunningStack) -> Metadata:
    """A second user of acme."""
    connection = await nats.connect(stack.settings.nats_url)
    try:
        _, key = await (await KeyStore.open(connection.jetstream())).create(f"mallory-{uuid.uuid4().hex[:6]}", "acme", ("user",))
    finally:
        await connection.close()
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
async def documents(stack: RunningStack) -> list[str]:
    """Two indexed articles of acme to read and be recommended."""
    suffix = uuid.uuid4().hex[:6]
    articles = {
        f"returns-{suffix}": "Returns. You can return any jacket within 30 days for a full refund; returns are free in Germany.",
        f"exchanges-{suffix}": "Exchanges. To exchange a jacket for another size, return it within 30 days and order the new size.",
    }
    async with grpc.aio.insecure_channel(stack.addr("ingest")) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        for document_id, text in articles.items():
            await ingest.SubmitDocument(
                ingest_pb2.SubmitDocumentRequest(document_id=document_id, title=text.split(".")[0], content=text.encode()),
                metadata=ADMIN,
            )
        for document_id in articles:
            for _ in range(600):
                status = await ingest.GetDocumentStatus(ingest_pb2.GetDocumentStatusRequest(document_id=document_id), metadata=ADMIN)
                if status.stage == common_pb2.DOCUMENT_STAGE_INDEXED:
                    break
                await asyncio.sleep(0.1)
            assert status.stage == common_pb2.DOCUMENT_STAGE_INDEXED, status
    return list(articles)


async def denied(call: Awaitable[object]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, error.value
    return error.value.details() or ""


async def chat(dialogue: dialogue_pb2_grpc.DialogueServiceStub, metadata: Metadata, message: str, session_id: str = "",
               user_id: str = "") -> list[dialogue_pb2.ChatResponse]:
    request = dialogue_pb2.ChatRequest(session_id=session_id, message=message, user_id=user_id)
    return [response async for response in dialogue.Chat(request, metadata=metadata, timeout=180)]


@pytest.mark.timeout(600)
async def test_another_user_of_the_tenant_cannot_read_continue_or_end_a_session(stack: RunningStack, mallory: Metadata) -> None:
    async with grpc.aio.insecure_channel(stack.addr("dialogue")) as channel:
        dialogue = dialogue_pb2_grpc.DialogueServiceStub(channel)
        session_id = (await chat(dialogue, ALICE, "Hi!"))[0].session_id
        details = await denied(dialogue.GetSession(dialogue_pb2.GetSessionRequest(session_id=session_id), metadata=mallory))
        assert "another user" in details
        own = await dialogue.GetSession(dialogue_pb2.GetSessionRequest(session_id=session_id), metadata=ALICE)
        assert own.user_id == "alice"  # the owner is the caller, stored with the session
        await denied(dialogue.EndSession(dialogue_pb2.EndSessionRequest(session_id=session_id), metadata=mallory))
        await denied(chat(dialogue, mallory, "What did I ask before?", session_id))
        # Naming alice does not make mallory alice.
        await denied(chat(dialogue, mallory, "What did I ask before?", session_id, user_id="alice"))
        await denied(chat(dialogue, mallory, "Hi!", user_id="alice"))

        # alice's session is untouched, and she goes on with it.
        await chat(dialogue, ALICE, "Hello again", session_id)
        own = await dialogue.GetSession(dialogue_pb2.GetSessionRequest(session_id=session_id), metadata=ALICE)
        assert len(own.turns) == 2 and own.user_id == "alice"

        # An operator of the tenant may read and end it, and start one for a customer.
        seen = await dialogue.GetSession(dialogue_pb2.GetSessionRequest(session_id=session_id), metadata=OPERATOR)
        assert len(seen.turns) == 2
        for_alice = (await chat(dialogue, OPERATOR, "Hi!", user_id="alice"))[0].session_id
        assert (await dialogue.GetSession(dialogue_pb2.GetSessionRequest(session_id=for_alice), metadata=ALICE)).user_id == "alice"
        ended = await dialogue.EndSession(dialogue_pb2.EndSessionRequest(session_id=session_id), metadata=OPERATOR)
        assert ended.ended


async def test_another_user_of_the_tenant_cannot_read_or_poison_a_profile(
    stack: RunningStack, mallory: Metadata, documents: list[str]
) -> None:
    read, other = documents
    async with grpc.aio.insecure_channel(stack.addr("retrieval")) as channel:
        retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        await retrieval.GetDocument(retrieval_pb2.GetDocumentRequest(document_id=read, user_id="alice"), metadata=ALICE)
        await denied(retrieval.Recommend(retrieval_pb2.RecommendRequest(user_id="alice"), metadata=mallory))
        # alice's own recommendations: her user id is the default.
        mine = await retrieval.Recommend(retrieval_pb2.RecommendRequest(top_k=5), metadata=ALICE)
        assert other in [r.document_id for r in mine.recommendations]

        await denied(retrieval.GetDocument(retrieval_pb2.GetDocumentRequest(document_id=other, user_id="alice"), metadata=mallory))
        await denied(retrieval.Search(retrieval_pb2.SearchRequest(query="exchange a jacket", user_id="alice"), metadata=mallory))
        # Nothing mallory tried reached alice's profile: what she read is still not recommended back.
        after = await retrieval.Recommend(retrieval_pb2.RecommendRequest(top_k=5), metadata=ALICE)
        assert [r.document_id for r in after.recommendations] == [r.document_id for r in mine.recommendations]

        # An operator may read the profile and record for the user.
        seen = await retrieval.Recommend(retrieval_pb2.RecommendRequest(user_id="alice", top_k=5), metadata=OPERATOR)
        assert [r.document_id for r in seen.recommendations] == [r.document_id for r in mine.recommendations]
        await retrieval.GetDocument(retrieval_pb2.GetDocumentRequest(document_id=other, user_id="alice"), metadata=OPERATOR)
        assert other not in [
            r.document_id for r in (await retrieval.Recommend(retrieval_pb2.RecommendRequest(top_k=5), metadata=ALICE)).recommendations
        ]
