"""Every RPC × every kind of caller answers the right status, and every denial is audited."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import grpc
import pytest
from google.protobuf import symbol_database
from google.protobuf.descriptor import MethodDescriptor

from llmos.keys import parse_static_keys
from llmos.policy import RPC_PERMISSIONS, permissions_of
from llmos.settings import SERVICE_NAMES
from llmos.v1 import audit_pb2, audit_pb2_grpc, dialogue_pb2, events_pb2, inference_pb2, ingest_pb2
from llmos.v1 import retrieval_pb2, speech_pb2, tokenizer_pb2
from tests.conftest import TEST_API_KEY, TEST_KEYS, RunningStack

pytestmark = pytest.mark.security

MODULES = {"ingest": ingest_pb2, "tokenizer": tokenizer_pb2, "inference": inference_pb2, "retrieval": retrieval_pb2,
           "speech": speech_pb2, "dialogue": dialogue_pb2, "audit": audit_pb2}
PRINCIPALS = parse_static_keys(",".join(f"{key}={identity}" for key, identity in TEST_KEYS.items()))
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def all_rpcs() -> list[tuple[str, MethodDescriptor]]:
    return [(service, method) for service in SERVICE_NAMES
            for descriptor in MODULES[service].DESCRIPTOR.services_by_name.values() for method in descriptor.methods]


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


async def call(stack: RunningStack, service: str, method: MethodDescriptor, key: str | None, request: Any = None) -> grpc.StatusCode:
    """Call any RPC with an empty (or given) request; the status it ends with."""
    return (await call_result(stack, service, method, key, request))[0]


# grpc/grpc#36066: when a server ends a client-streaming call before the client has sent
# everything, the asyncio client may replace the server's status with this one. Such a call is
# made again: the server's answer is what is under test.
CLIENT_RACE = (grpc.StatusCode.INTERNAL, "Internal error from Core")


async def call_result(
    stack: RunningStack, service: str, method: MethodDescriptor, key: str | None, request: Any = None
) -> tuple[grpc.StatusCode, str]:
    """The status and details a call ends with."""
    for _ in range(5):
        result = await _call_once(stack, service, method, key, request)
        if not (method.client_streaming and result == CLIENT_RACE):
            return result
    return result


async def _call_once(
    stack: RunningStack, service: str, method: MethodDescriptor, key: str | None, request: Any
) -> tuple[grpc.StatusCode, str]:
    request_type = symbol_database.Default().GetSymbol(method.input_type.full_name)
    response_type = symbol_database.Default().GetSymbol(method.output_type.full_name)
    request = request if request is not None else request_type()
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    async with grpc.aio.insecure_channel(stack.addr(service)) as channel:
        kind = ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming else "unary")
        stub = getattr(channel, kind)(path(method), request_serializer=lambda m: m.SerializeToString(),
                                      response_deserializer=response_type.FromString)
        try:
            if method.client_streaming:
                rpc = stub(iter([request]), metadata=metadata, timeout=10)
            else:
                rpc = stub(request, metadata=metadata, timeout=10)
            if method.server_streaming:
                async for _ in rpc:
                    pass
            else:
                await rpc
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def test_every_rpc_has_an_access_policy() -> None:
    assert {path(method) for _, method in all_rpcs()} == set(RPC_PERMISSIONS)


async def test_access_matrix(stack: RunningStack) -> None:
    outcomes: Counter[str] = Counter()
    for service, method in all_rpcs():
        permission = RPC_PERMISSIONS[path(method)]
        assert await call(stack, service, method, None) == grpc.StatusCode.UNAUTHENTICATED, path(method)
        assert await call(stack, service, method, "not-a-key") == grpc.StatusCode.UNAUTHENTICATED, path(method)
        assert await call(stack, service, method, "llmos_0123456789ab_forged") == grpc.StatusCode.UNAUTHENTICATED
        outcomes["unauthenticated"] += 3
        for key, principal in PRINCIPALS.items():
            raw_key = next(k for k, identity in TEST_KEYS.items() if identity.startswith(principal.subject + ":"))
            status = await call(stack, service, method, raw_key)
            if permission in permissions_of(principal):
                assert status not in DENIED, f"{principal.subject} refused {path(method)}: {status}"
                outcomes["allowed"] += 1
            else:
                assert status == grpc.StatusCode.PERMISSION_DENIED, f"{principal.subject} got {status} on {path(method)}"
                outcomes["insufficient role"] += 1
        request_type = symbol_database.Default().GetSymbol(method.input_type.full_name)
        if "tenant" in request_type.DESCRIPTOR.fields_by_name and not method.client_streaming:
            status = await call(stack, service, method, "user-key-globex", request_type(tenant="acme"))
            if await call(stack, service, method, "user-key-globex") != grpc.StatusCode.UNIMPLEMENTED:
                assert status == grpc.StatusCode.PERMISSION_DENIED, f"cross-tenant {path(method)}: {status}"
                outcomes["other tenant"] += 1
    print(f"access matrix: {sum(outcomes.values())} calls over {len(all_rpcs())} RPCs: {dict(outcomes)}")
    assert outcomes["insufficient role"] > 0 and outcomes["other tenant"] > 0


async def test_denials_are_audited(stack: RunningStack) -> None:
    verify = next(method for _, method in all_rpcs() if method.name == "Verify")
    assert await call(stack, "audit", verify, "user-key-acme") == grpc.StatusCode.PERMISSION_DENIED
    async with grpc.aio.insecure_channel(stack.addr("audit")) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        for _ in range(100):
            records = [r async for r in stub.Query(
                audit_pb2.QueryAuditRequest(principal="alice", action="llmos.v1.AuditService/Verify"),
                metadata=(("authorization", f"Bearer {TEST_API_KEY}"),))]
            if records:
                break
            await asyncio.sleep(0.1)
    assert records and records[-1].event.decision == events_pb2.AUDIT_DECISION_DENY and "audit:verify" in records[-1].event.reason
