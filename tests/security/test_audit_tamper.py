"""Tampering with the running audit service's store is caught by `AuditService.Verify`."""

from __future__ import annotations

import asyncio
import sqlite3

import grpc
import pytest

from llmos.v1 import audit_pb2, audit_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from tests.conftest import RunningStack
from tests.grpc_helpers import ADMIN

pytestmark = pytest.mark.security


async def verify(stack: RunningStack) -> audit_pb2.VerifyAuditResponse:
    async with grpc.aio.insecure_channel(stack.addr("audit")) as channel:
        return await audit_pb2_grpc.AuditServiceStub(channel).Verify(audit_pb2.VerifyAuditRequest(), metadata=ADMIN)


async def test_edit_delete_and_reorder_are_reported(stack: RunningStack) -> None:
    async with grpc.aio.insecure_channel(stack.addr("tokenizer")) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        for _ in range(3):  # denials are audited: three records at least
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.CountTokens(tokenizer_pb2.CountTokensRequest(texts=["x"]), metadata=(("authorization", "Bearer nope"),))
    for _ in range(100):
        result = await verify(stack)
        if result.records_checked >= 3:
            break
        await asyncio.sleep(0.1)
    assert result.intact and result.records_checked >= 3

    database = sqlite3.connect(stack.home / "data" / "audit.sqlite3", isolation_level=None)
    original = database.execute("SELECT event FROM audit_records WHERE sequence = 2").fetchone()
    try:
        database.execute("UPDATE audit_records SET event = ? WHERE sequence = 2", (original[0][:-1] + bytes([original[0][-1] ^ 1]),))
        edited = await verify(stack)
        assert not edited.intact and edited.first_broken_sequence == 2 and "edited" in edited.reason
    finally:
        database.execute("UPDATE audit_records SET event = ? WHERE sequence = 2", (original[0],))
    assert (await verify(stack)).intact

    first, second = database.execute("SELECT * FROM audit_records WHERE sequence IN (1, 2) ORDER BY sequence").fetchall()
    insert = f"INSERT INTO audit_records VALUES ({', '.join('?' * len(first))})"
    try:
        database.execute("DELETE FROM audit_records WHERE sequence IN (1, 2)")
        database.execute(insert, (1, *second[1:]))
        database.execute(insert, (2, *first[1:]))
        reordered = await verify(stack)
        assert not reordered.intact and reordered.first_broken_sequence == 1
    finally:
        database.execute("DELETE FROM audit_records WHERE sequence IN (1, 2)")
        database.execute(insert, first)
        database.execute(insert, second)
    assert (await verify(stack)).intact
    database.close()
