"""Admission on real inference: past capacity a Generate is refused at once with a retry hint,
instead of queueing past its deadline; a request that fits is served."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llmos.grpcutil.status import RETRY_AFTER_MS_KEY
from llmos.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.conftest import NatsServer, RunningStack
from tests.grpc_helpers import ADMIN
from tests.integration.test_inference_embed import start_inference

pytestmark = pytest.mark.integration

REFUSAL_WITHIN_S = 0.1


@pytest.fixture(scope="module")
def inference(nats_server: NatsServer, models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    # One decode slot, none reserved, and chats queued only for a tenth of a second of expected wait.
    overrides = {
        "LLMOS_INFERENCE_MAX_BATCH": "1",
        "LLMOS_INFERENCE_RESERVED_INTERACTIVE_SLOTS": "0",
        "LLMOS_INFERENCE_INTERACTIVE_MAX_WAIT_S": "0.1",
    }
    yield from start_inference(nats_server, models_home, tmp_path_factory.mktemp("inference-admission"), overrides)


def generate(stub: inference_pb2_grpc.InferenceServiceStub, priority: common_pb2.Priority.ValueType,
             max_new_tokens: int, timeout_s: float) -> grpc.aio.UnaryStreamCall:
    return stub.Generate(
        inference_pb2.GenerateRequest(prompt="Once upon a time", priority=priority,
                                      sampling=inference_pb2.SamplingParams(max_new_tokens=max_new_tokens)),
        metadata=ADMIN, timeout=timeout_s,
    )


async def refused_within(call: grpc.aio.UnaryStreamCall) -> tuple[grpc.aio.AioRpcError, float]:
    """The call's error and the seconds from the call to it (`call` was made just before)."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call.read()
    return error.value, time.monotonic() - started


async def test_past_capacity_a_generate_is_refused_at_once_with_a_retry_hint(inference: RunningStack) -> None:
    # Raw calls, so the trailer on the wire can be read.
    async with grpc.aio.insecure_channel(inference.addr("inference")) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=ADMIN)  # the channel is connected
        running = generate(stub, common_pb2.PRIORITY_INTERACTIVE, 400, 120)
        await running.read()  # it holds the only slot
        queued = generate(stub, common_pb2.PRIORITY_STANDARD, 400, 120)  # and one waits behind it
        await asyncio.sleep(0.5)  # decode steps measured

        # A chat expected to wait longer than the longest wait allowed.
        started = time.monotonic()
        error, _ = await refused_within(generate(stub, common_pb2.PRIORITY_INTERACTIVE, 8, 60))
        elapsed = time.monotonic() - started
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert elapsed < REFUSAL_WITHIN_S, f"refused after {elapsed * 1000:.0f} ms"
        assert "would wait about" in (error.details() or "")
        trailing = dict(error.trailing_metadata() or ())
        assert int(trailing[RETRY_AFTER_MS_KEY]) > 0

        # A standard request (no longest wait) expected to finish after its deadline: 0.3 s left.
        started = time.monotonic()
        error, _ = await refused_within(generate(stub, common_pb2.PRIORITY_STANDARD, 8, 0.3))
        elapsed = time.monotonic() - started
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert elapsed < REFUSAL_WITHIN_S, f"refused after {elapsed * 1000:.0f} ms"
        assert "after its deadline" in (error.details() or "")
        assert int(dict(error.trailing_metadata() or ())[RETRY_AFTER_MS_KEY]) > 0

        # One whose deadline the wait fits in is queued and served.
        fits = generate(stub, common_pb2.PRIORITY_STANDARD, 4, 120)
        running.cancel()
        queued.cancel()
        responses = [response async for response in fits]
        assert responses[-1].usage.generated_tokens == 4


async def test_with_a_slot_free_nothing_is_refused(inference: RunningStack) -> None:
    async with grpc.aio.insecure_channel(inference.addr("inference")) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        responses = [response async for response in generate(stub, common_pb2.PRIORITY_INTERACTIVE, 4, 60)]
        assert responses[-1].usage.generated_tokens == 4
