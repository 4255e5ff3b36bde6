"""Nothing of one tenant is visible to another: documents, search, chat, sessions and the audit
trail, with look-alike documents (same id, same title, near-identical text) in both tenants."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from llmos.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    dialogue_pb2,
    dialogue_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from tests.conftest import RunningStack
from tests.grpc_helpers import ACME_OPERATOR, ACME_USER, ADMIN, GLOBEX_USER

pytestmark = pytest.mark.security

CALLERS = {"acme": ACME_USER, "globex": GLOBEX_USER}


async def test_look_alike_documents_stay_in_their_tenant(stack: RunningStack) -> None:
    async with grpc.aio.insecure_channel(stack.addr("ingest")) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        await ingest.SubmitDocument(ingest_pb2.SubmitDocumentRequest(document_id="pricing", content=b"Acme price list: 10 EUR."), metadata=ACME_OPERATOR)
        await ingest.SubmitDocument(
            ingest_pb2.SubmitDocumentRequest(tenant="globex", document_id="pricing", content=b"Globex price list: 99 EUR."), metadata=ADMIN
        )
        acme = await ingest.GetDocumentStatus(ingest_pb2.GetDocumentStatusRequest(document_id="pricing"), metadata=ACME_OPERATOR)
        globex = await ingest.GetDocumentStatus(ingest_pb2.GetDocumentStatusRequest(document_id="pricing"), metadata=GLOBEX_USER)
        assert acme.tenant == "acme" and globex.tenant == "globex" and acme.content_hash != globex.content_hash
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await ingest.DeleteDocument(ingest_pb2.DeleteDocumentRequest(tenant="acme", document_id="pricing"), metadata=GLOBEX_USER)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_an_operator_cannot_write_or_delete_in_another_tenant(stack: RunningStack) -> None:
    """An operator may write in their own tenant; naming another one is refused (PERMISSION_DENIED,
    by design never redirected to the operator's own tenant), and neither tenant's copy changes."""
    document_id = f"contract-{uuid.uuid4().hex[:6]}"
    originals = {"acme": b"Acme contract: 30 days notice.", "globex": b"Globex contract: 90 days notice."}
    async with grpc.aio.insecure_channel(stack.addr("ingest")) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)

        async def status_of(tenant: str) -> ingest_pb2.DocumentStatus:
            return await ingest.GetDocumentStatus(ingest_pb2.GetDocumentStatusRequest(tenant=tenant, document_id=document_id), metadata=ADMIN)

        for tenant, content in originals.items():
            await ingest.SubmitDocument(ingest_pb2.SubmitDocumentRequest(tenant=tenant, document_id=document_id, content=content), metadata=ADMIN)
        before = {tenant: await status_of(tenant) for tenant in originals}
        for attempt in (
            ingest.SubmitDocument(ingest_pb2.SubmitDocumentRequest(tenant="globex", document_id=document_id, content=b"Rewritten by acme."),
                                  metadata=ACME_OPERATOR),
            ingest.SubmitDocument(ingest_pb2.SubmitDocumentRequest(tenant="globex", document_id=f"{document_id}-new", content=b"Planted by acme."),
                                  metadata=ACME_OPERATOR),
            ingest.DeleteDocument(ingest_pb2.DeleteDocumentRequest(tenant="globex", document_id=document_id), metadata=ACME_OPERATOR),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await attempt
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "may not act on tenant 'globex'" in (error.value.details() or "")
        after = {tenant: await status_of(tenant) for tenant in originals}
        for tenant in originals:
            assert after[tenant].content_hash == before[tenant].content_hash, f"{tenant}'s copy was rewritten"
            assert after[tenant].stage != common_pb2.DOCUMENT_STAGE_DELETED, f"{tenant}'s copy was deleted"
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await ingest.GetDocumentStatus(ingest_pb2.GetDocumentStatusRequest(tenant="globex", document_id=f"{document_id}-new"), metadata=ADMIN)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND, "a document was planted in globex"
        # The control: the same operator deletes its own tenant's copy, and only that one.
        deleted = await ingest.DeleteDocument(ingest_pb2.DeleteDocumentRequest(document_id=document_id), metadata=ACME_OPERATOR)
        assert deleted.deleted
        assert (await status_of("acme")).stage == common_pb2.DOCUMENT_STAGE_DELETED
        assert (await status_of("globex")).stage != common_pb2.DOCUMENT_STAGE_DELETED


async def test_the_audit_trail_is_confined_to_the_operators_tenant(stack: RunningStack) -> None:
    # Only records from now on: after the fuzz modules the tenant's trail holds thousands, oldest first.
    submitted_at = Timestamp()
    submitted_at.GetCurrentTime()
    recent = audit_pb2.QueryAuditRequest(tenant="globex", start_time=submitted_at)
    async with grpc.aio.insecure_channel(stack.addr("ingest")) as channel:
        await ingest_pb2_grpc.IngestServiceStub(channel).SubmitDocument(
            ingest_pb2.SubmitDocumentRequest(tenant="globex", document_id="globex-only", content=b"Globex internal."), metadata=ADMIN
        )
    async with grpc.aio.insecure_channel(stack.addr("audit")) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        for _ in range(100):
            every = [r async for r in audit.Query(recent, metadata=ADMIN)]
            if any(r.event.resource == "document/globex-only" for r in every):
                break
            await asyncio.sleep(0.1)
        assert any(r.event.resource == "document/globex-only" for r in every)
        mine = [r async for r in audit.Query(audit_pb2.QueryAuditRequest(), metadata=ACME_OPERATOR)]
        assert mine and {r.event.tenant for r in mine} == {"acme"}
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in audit.Query(audit_pb2.QueryAuditRequest(tenant="globex"), metadata=ACME_OPERATOR):
                pass
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in audit.Query(audit_pb2.QueryAuditRequest(), metadata=GLOBEX_USER):
                pass
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


@dataclass(frozen=True)
class LookAlikes:
    document_id: str
    seeded_at: Timestamp
    secrets: dict[str, str]  # tenant -> a code only that tenant's document holds
    chunk_ids: dict[str, set[str]]  # tenant -> its document's chunk ids

    def foreign_secret(self, tenant: str) -> str:
        return next(secret for owner, secret in self.secrets.items() if owner != tenant)


@pytest.fixture(scope="module")
async def look_alikes(stack: RunningStack) -> LookAlikes:
    """The same refund policy in acme and globex, differing only in the tenant's name and code."""
    document_id = f"refund-policy-{uuid.uuid4().hex[:6]}"
    seeded_at = Timestamp()
    seeded_at.GetCurrentTime()
    secrets = {tenant: f"{tenant.upper()}{uuid.uuid4().int % 10**6:06d}" for tenant in CALLERS}
    async with grpc.aio.insecure_channel(stack.addr("ingest")) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        for tenant, secret in secrets.items():
            text = (
                f"Refund policy. Customers can return gift cards within 30 days for a full refund. "
                f"Quote the refund code {secret} when you contact support about a gift card refund."
            )
            await ingest.SubmitDocument(
                ingest_pb2.SubmitDocumentRequest(tenant=tenant, document_id=document_id, title="Refund policy", content=text.encode()),
                metadata=ADMIN,
            )
        for tenant in secrets:
            for _ in range(600):
                status = await ingest.GetDocumentStatus(ingest_pb2.GetDocumentStatusRequest(tenant=tenant, document_id=document_id), metadata=ADMIN)
                if status.stage == common_pb2.DOCUMENT_STAGE_INDEXED:
                    break
                await asyncio.sleep(0.1)
            assert status.stage == common_pb2.DOCUMENT_STAGE_INDEXED, f"{tenant}: {status}"
    chunk_ids: dict[str, set[str]] = {}
    async with grpc.aio.insecure_channel(stack.addr("retrieval")) as channel:
        retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        for tenant, caller in CALLERS.items():
            document = await retrieval.GetDocument(retrieval_pb2.GetDocumentRequest(document_id=document_id), metadata=caller)
            assert secrets[tenant] in " ".join(chunk.text for chunk in document.chunks)
            chunk_ids[tenant] = {chunk.chunk_id for chunk in document.chunks}
    assert not chunk_ids["acme"] & chunk_ids["globex"]
    return LookAlikes(document_id, seeded_at, secrets, chunk_ids)


@pytest.mark.parametrize("tenant", list(CALLERS))
async def test_search_and_get_document_return_only_the_callers_look_alike(
    stack: RunningStack, look_alikes: LookAlikes, tenant: str
) -> None:
    foreign = look_alikes.foreign_secret(tenant)
    async with grpc.aio.insecure_channel(stack.addr("retrieval")) as channel:
        retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        for mode in (retrieval_pb2.SEARCH_MODE_HYBRID, retrieval_pb2.SEARCH_MODE_DENSE, retrieval_pb2.SEARCH_MODE_SPARSE):
            for query in ("gift card refund code", foreign, f"refund code {foreign}"):
                response = await retrieval.Search(
                    retrieval_pb2.SearchRequest(query=query, mode=mode, top_k=50), metadata=CALLERS[tenant]
                )
                assert all(hit.chunk.tenant == tenant for hit in response.hits), (mode, query)
                assert not any(foreign in hit.chunk.text for hit in response.hits), (mode, query)
            ours = [hit for hit in response.hits if hit.chunk.document_id == look_alikes.document_id]
            assert ours and {hit.chunk.chunk_id for hit in ours} <= look_alikes.chunk_ids[tenant]
        # Naming the look-alike's id finds only the caller's own copy.
        filtered = await retrieval.Search(
            retrieval_pb2.SearchRequest(query="refund", filter=retrieval_pb2.SearchFilter(document_ids=[look_alikes.document_id])),
            metadata=CALLERS[tenant],
        )
        assert filtered.hits and all(look_alikes.secrets[tenant] in hit.chunk.text for hit in filtered.hits)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            other = next(t for t in CALLERS if t != tenant)
            await retrieval.Search(retrieval_pb2.SearchRequest(query="refund", tenant=other), metadata=CALLERS[tenant])
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def chat(stub: dialogue_pb2_grpc.DialogueServiceStub, metadata: tuple[tuple[str, str], ...], message: str,
               session_id: str = "") -> list[dialogue_pb2.ChatResponse]:
    request = dialogue_pb2.ChatRequest(session_id=session_id, message=message)
    return [response async for response in stub.Chat(request, metadata=metadata, timeout=180)]


@pytest.mark.timeout(600)
async def test_chat_answers_and_sessions_stay_in_their_tenant(stack: RunningStack, look_alikes: LookAlikes) -> None:
    async with grpc.aio.insecure_channel(stack.addr("dialogue")) as channel:
        dialogue = dialogue_pb2_grpc.DialogueServiceStub(channel)
        sessions: dict[str, str] = {}
        cited_any = False
        for tenant, caller in CALLERS.items():
            responses = await chat(dialogue, caller, "What refund code do I quote for a gift card refund?")
            sessions[tenant] = responses[0].session_id
            answer = "".join(response.delta for response in responses)
            citations = responses[-1].citations
            assert look_alikes.foreign_secret(tenant) not in answer
            assert not any(c.chunk_id in look_alikes.chunk_ids[other] for other in CALLERS if other != tenant for c in citations)
            cited_any |= any(c.chunk_id in look_alikes.chunk_ids[tenant] for c in citations)
        # The check above is only meaningful if chat did retrieve the look-alikes at all.
        assert cited_any, "neither tenant's chat cited its refund policy"

        for tenant, caller in CALLERS.items():
            other_session = next(session for owner, session in sessions.items() if owner != tenant)
            for call in (
                dialogue.GetSession(dialogue_pb2.GetSessionRequest(session_id=other_session), metadata=caller),
                dialogue.EndSession(dialogue_pb2.EndSessionRequest(session_id=other_session), metadata=caller),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call
                assert error.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await chat(dialogue, caller, "and what about my order?", other_session)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            # The owner's session is untouched by the other tenant's attempts.
            own = await dialogue.GetSession(dialogue_pb2.GetSessionRequest(session_id=sessions[tenant]), metadata=caller)
            assert own.tenant == tenant and len(own.turns) == 1
            assert look_alikes.foreign_secret(tenant) not in str(own)


async def test_the_audit_trail_of_look_alikes_is_split_by_tenant(stack: RunningStack, look_alikes: LookAlikes) -> None:
    resource = f"document/{look_alikes.document_id}"
    async with grpc.aio.insecure_channel(stack.addr("audit")) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        since = dict(start_time=look_alikes.seeded_at, page=common_pb2.PageRequest(page_size=1000))
        for _ in range(100):
            every = [r async for r in audit.Query(audit_pb2.QueryAuditRequest(tenant="globex", **since), metadata=ADMIN)]
            if any(r.event.resource == resource for r in every):
                break
            await asyncio.sleep(0.1)
        acme = [r async for r in audit.Query(audit_pb2.QueryAuditRequest(**since), metadata=ACME_OPERATOR)]
        assert any(r.event.resource == resource for r in acme), "acme's own record of the look-alike"
        assert {r.event.tenant for r in acme} == {"acme"}
        assert not any(look_alikes.secrets["globex"] in str(r) for r in acme)
