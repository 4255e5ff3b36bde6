"""Nothing of one tenant is visible to another: documents and the audit trail.
(Search, chat and sessions are checked where those services are built.)"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmos.v1 import audit_pb2, audit_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningStack

pytestmark = pytest.mark.security

ACME_OPERATOR = (("authorization", "Bearer operator-key-acme"),)
GLOBEX_USER = (("authorization", "Bearer user-key-globex"),)
ADMIN = (("authorization", "Bearer test-admin-key"),)


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


async def test_the_audit_trail_is_confined_to_the_operators_tenant(stack: RunningStack) -> None:
    async with grpc.aio.insecure_channel(stack.addr("ingest")) as channel:
        await ingest_pb2_grpc.IngestServiceStub(channel).SubmitDocument(
            ingest_pb2.SubmitDocumentRequest(tenant="globex", document_id="globex-only", content=b"Globex internal."), metadata=ADMIN
        )
    async with grpc.aio.insecure_channel(stack.addr("audit")) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        for _ in range(100):
            every = [r async for r in audit.Query(audit_pb2.QueryAuditRequest(tenant="globex"), metadata=ADMIN)]
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
