"""Fuzzing: random bytes on every consumed subject and random field values on every RPC.
Nothing crashes or hangs; every answer is a deliberate status."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import symbol_database
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmos.bus.subjects import AUDIT_ALL, CHUNKS_CREATED, CHUNKS_EMBEDDED, DOCS_DELETED, DOCS_INDEXED, INGEST_REQUESTED
from llmos.settings import SERVICE_NAMES
from tests.conftest import RunningStack
from tests.integration.bus_helpers import publish
from tests.security.test_access_matrix import all_rpcs, call_result

pytestmark = pytest.mark.security

CONSUMED_SUBJECTS = (INGEST_REQUESTED, CHUNKS_CREATED, CHUNKS_EMBEDDED, DOCS_DELETED, DOCS_INDEXED, AUDIT_ALL.replace(">", "fuzz"))
# Statuses that mean the service understood the call and chose its answer (a generation that
# outlives the 10 s deadline of the call is stopped by it: DEADLINE_EXCEEDED, not a hang).
DELIBERATE = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS,
}
TEXT = st.text(max_size=40)
SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_INT32: st.integers(-10, 64),
    FieldDescriptor.TYPE_INT64: st.integers(-10, 10**6),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**32),
    FieldDescriptor.TYPE_FLOAT: st.one_of(st.floats(-2, 2, width=32), st.just(float("nan"))),
    FieldDescriptor.TYPE_DOUBLE: st.one_of(st.floats(-2, 2), st.just(float("nan"))),
}


def message_values(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Random values for a message's fields (nested messages two levels deep)."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                fields[field.name] = st.dictionaries(TEXT, TEXT, max_size=2)
                continue
            if depth >= 2 or field.message_type.full_name.startswith("google.protobuf"):
                continue
            value = message_values(field.message_type, depth + 1)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            value = st.sampled_from([number.number for number in field.enum_type.values] + [99])
        else:
            value = SCALARS.get(field.type)
            if value is None:
                continue
        fields[field.name] = st.lists(value, max_size=3) if field.is_repeated else value
    return st.fixed_dictionaries({}, optional=fields)


def build(descriptor: Descriptor, values: dict[str, Any]) -> Any:
    message = symbol_database.Default().GetSymbol(descriptor.full_name)()
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            getattr(message, name).update(value)
        elif field.message_type is not None:
            if field.is_repeated:
                getattr(message, name).extend(build(field.message_type, item) for item in value)
            else:
                getattr(message, name).CopyFrom(build(field.message_type, value))
        elif field.is_repeated:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


async def all_serving(stack: RunningStack) -> bool:
    for service in SERVICE_NAMES:
        async with grpc.aio.insecure_channel(stack.addr(service)) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            if response.status != health_pb2.HealthCheckResponse.SERVING:
                return False
    return True


async def test_random_bytes_on_consumed_subjects(stack: RunningStack) -> None:
    tried = 0

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(payload=st.binary(max_size=256), subject=st.sampled_from(CONSUMED_SUBJECTS))
    def send(payload: bytes, subject: str) -> None:
        nonlocal tried
        tried += 1
        asyncio.run_coroutine_threadsafe(publish(stack.settings.nats_url, subject, payload), loop).result(timeout=10)

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(send)
    await asyncio.sleep(2)
    assert await all_serving(stack)
    print(f"bus fuzz: {tried} random payloads over {len(CONSUMED_SUBJECTS)} subjects; all services SERVING")


async def test_random_field_values_on_every_rpc(stack: RunningStack) -> None:
    outcomes: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    for service, method in all_rpcs():

        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
        @given(values=message_values(method.input_type))
        def fuzz(values: dict[str, Any]) -> None:
            request = build(method.input_type, values)
            status, details = asyncio.run_coroutine_threadsafe(
                call_result(stack, service, method, "test-admin-key", request), loop
            ).result(timeout=30)
            outcomes[status.name] = outcomes.get(status.name, 0) + 1
            assert status in DELIBERATE, f"{method.full_name} answered {status.name} ({details}) to {request}"

        await asyncio.to_thread(fuzz)
    assert await all_serving(stack)
    print(f"rpc fuzz: {sum(outcomes.values())} calls over {len(all_rpcs())} RPCs: {outcomes}")
