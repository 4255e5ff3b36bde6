"""Turn-level admission over gRPC (issue 15, item 5): past capacity a Chat turn is refused at once
with RESOURCE_EXHAUSTED and the retry hint in grpc-retry-pushback-ms."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from llmos.grpcutil.status import RETRY_AFTER_MS_KEY
from llmos.stack import stop_pids, wait_until_serving
from llmos.v1 import dialogue_pb2, dialogue_pb2_grpc
from tests.conftest import RunningStack, _settings_from, free_port
from tests.grpc_helpers import ADMIN

pytestmark = pytest.mark.integration

QUESTIONS = [
    "How long do I have to return an item?", "Do you ship to Norway?", "How much is express delivery?",
    "Can I pay with Klarna?", "How long are gift cards valid?", "What are your store opening hours?",
    "How do I reset my password?", "Can I change my delivery address?",
]


@pytest.mark.timeout(300)
async def test_a_turn_past_capacity_is_refused_at_once_with_a_retry_hint(stack: RunningStack, tmp_path: Path) -> None:
    """A dialogue process of our own whose longest wait is a millisecond: once turns in company have
    set a pace, a turn arriving behind others is refused before any work, the hint in the trailer."""
    env = {**stack.env, "LLMOS_DIALOGUE_ADDR": f"127.0.0.1:{free_port()}", "LLMOS_DIALOGUE_MAX_TURN_WAIT_S": "0.001"}
    settings = _settings_from(env)
    with (tmp_path / "dialogue.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.dialogue"], cwd=stack.home, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until_serving(settings, {"dialogue": process}, timeout_s=120)
        async with grpc.aio.insecure_channel(settings.service_addr("dialogue")) as channel:
            stub = dialogue_pb2_grpc.DialogueServiceStub(channel)

            async def turn(message: str) -> tuple[grpc.StatusCode, float, dict[str, str]]:
                started = time.perf_counter()
                call = stub.Chat(dialogue_pb2.ChatRequest(message=message), metadata=ADMIN, timeout=120)
                try:
                    async for _ in call:
                        pass
                except grpc.aio.AioRpcError:
                    pass
                trailers = {key: str(value) for key, value in (await call.trailing_metadata() or ())}
                return await call.code(), time.perf_counter() - started, trailers

            # Two together: both answered (nothing measured yet), and they set the pace.
            assert [code for code, _, _ in await asyncio.gather(*(turn(q) for q in QUESTIONS[:2]))] == [grpc.StatusCode.OK] * 2
            outcomes = await asyncio.gather(*(turn(q) for q in QUESTIONS))
        codes = [code for code, _, _ in outcomes]
        assert grpc.StatusCode.OK in codes  # the first of a burst always goes in
        refused = [(seconds, trailers) for code, seconds, trailers in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert refused, codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        for seconds, trailers in refused:
            assert int(trailers[RETRY_AFTER_MS_KEY]) > 0
        answered = [seconds for code, seconds, _ in outcomes if code == grpc.StatusCode.OK]
        # Refused before any work: sooner than any answer (a loaded shared machine makes absolute times unfit).
        assert max(seconds for seconds, _ in refused) < min(answered), (refused, answered)
    finally:
        stop_pids([process.pid], timeout_s=15)
