"""Generate over gRPC: streaming, finish reasons, determinism, cancellation, admission control."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from llmos.clients import InferenceClient
from llmos.errors import DeadlineExceeded, InvalidArgument
from llmos.grpcutil.status import RETRY_AFTER_MS_KEY
from llmos.models.store import artefact_dir
from llmos.tokenization import ModelTokenizer
from llmos.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from services.inference.app import GENERATION_VARIANT
from services.inference.core import CPU, GENERATION_MODEL
from services.inference.decoder import Decoder
from services.inference.scheduler import (
    PREFILL_CHUNK_TOKENS,
    GenerationRequest,
    GenerationScheduler,
    PrefixCache,
    SamplingConfig,
    Usage,
)
from tests.conftest import NatsServer, RunningStack
from tests.grpc_helpers import ADMIN, connected
from tests.integration.test_inference_embed import start_inference

pytestmark = pytest.mark.integration

QUESTION = inference_pb2.ChatMessages(
    messages=[common_pb2.ChatMessage(role="user", content="What is the capital of France?")]
)


@pytest.fixture(scope="module")
def inference(nats_server: NatsServer, models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    # Two slots (one reserved for interactive work) and a queue of two: small enough to fill.
    overrides = {
        "LLMOS_INFERENCE_MAX_BATCH": "2",
        "LLMOS_INFERENCE_QUEUE_SIZE": "2",
        "LLMOS_INFERENCE_MAX_NEW_TOKENS": "512",
    }
    yield from start_inference(nats_server, models_home, tmp_path_factory.mktemp("inference-generate"), overrides)


@pytest.fixture
async def client(inference: RunningStack) -> AsyncIterator[InferenceClient]:
    async with connected(inference, InferenceClient) as inference_client:
        yield inference_client


async def collect(client: InferenceClient, request: inference_pb2.GenerateRequest) -> list[inference_pb2.GenerateResponse]:
    return [response async for response in client.generate(request, timeout_s=120)]


def text_of(responses: list[inference_pb2.GenerateResponse]) -> str:
    return "".join(response.delta for response in responses)


async def test_chat_streams_deltas_then_finish_and_usage(client: InferenceClient) -> None:
    responses = await collect(
        client, inference_pb2.GenerateRequest(messages=QUESTION, sampling=inference_pb2.SamplingParams(max_new_tokens=64))
    )
    assert len(responses) > 2
    assert all(r.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    assert not any(r.HasField("usage") for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason in (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH)
    assert "Paris" in text_of(responses)
    usage = last.usage
    assert usage.prompt_tokens > 10 and 0 < usage.generated_tokens <= 64
    assert sum(len(r.token_ids) for r in responses) == usage.generated_tokens
    assert usage.time_to_first_token_ms > 0 and usage.tokens_per_second > 0 and usage.queue_ms >= 0


async def test_length_and_stop_finish_reasons(client: InferenceClient) -> None:
    limited = await collect(
        client, inference_pb2.GenerateRequest(prompt="Count: 1, 2, 3,", sampling=inference_pb2.SamplingParams(max_new_tokens=5))
    )
    assert limited[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert limited[-1].usage.generated_tokens == 5
    full = text_of(await collect(
        client, inference_pb2.GenerateRequest(messages=QUESTION, sampling=inference_pb2.SamplingParams(max_new_tokens=40))
    ))
    stop = "Paris"
    assert stop in full
    stopped = await collect(
        client,
        inference_pb2.GenerateRequest(messages=QUESTION, sampling=inference_pb2.SamplingParams(max_new_tokens=40, stop=[stop])),
    )
    assert stopped[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
    assert text_of(stopped) == full[: full.index(stop)]


async def test_greedy_and_seeded_sampling_are_deterministic(client: InferenceClient) -> None:
    greedy = inference_pb2.GenerateRequest(messages=QUESTION, sampling=inference_pb2.SamplingParams(max_new_tokens=24))
    assert text_of(await collect(client, greedy)) == text_of(await collect(client, greedy))
    seeded = inference_pb2.GenerateRequest(
        messages=QUESTION, sampling=inference_pb2.SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=7)
    )
    first, second = await collect(client, seeded), await collect(client, seeded)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]


async def test_batched_streams_match_solo_streams(client: InferenceClient) -> None:
    prompts = ["Write a haiku about the sea.", "What is the capital of France?"]
    requests = [
        inference_pb2.GenerateRequest(
            messages=inference_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=p)]),
            sampling=inference_pb2.SamplingParams(max_new_tokens=20),
            priority=common_pb2.PRIORITY_INTERACTIVE,  # both slots
        )
        for p in prompts
    ]
    solo = [await collect(client, request) for request in requests]
    together = await asyncio.gather(*(collect(client, request) for request in requests))
    # The int4 kernels round differently for one row than for several, so a batched stream may
    # leave the solo one at a logit near-tie; up to there they must agree token for token.
    for alone, batched in zip(solo, together, strict=True):
        alone_ids = [token for r in alone for token in r.token_ids]
        batched_ids = [token for r in batched for token in r.token_ids]
        assert alone_ids[:12] == batched_ids[:12], (text_of(alone), text_of(batched))


async def test_interactive_work_preempts_batch_work_which_resumes_intact(client: InferenceClient) -> None:
    batch = inference_pb2.GenerateRequest(
        prompt="Once upon a time", sampling=inference_pb2.SamplingParams(max_new_tokens=40), priority=common_pb2.PRIORITY_BATCH
    )
    solo_ids = [token for r in await collect(client, batch) for token in r.token_ids]
    call = client.generate(batch, timeout_s=120)
    streamed = [await anext(call)]  # the batch stream holds the one non-reserved slot
    chats = await asyncio.gather(*(
        collect(client, inference_pb2.GenerateRequest(
            messages=inference_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=question)]),
            sampling=inference_pb2.SamplingParams(max_new_tokens=24), priority=common_pb2.PRIORITY_INTERACTIVE,
        ))
        for question in ("What is the capital of France?", "Write a haiku about the sea.")
    ))
    streamed += [response async for response in call]
    # The second chat took the batch stream's slot instead of waiting for the first chat to end.
    usages = [responses[-1].usage for responses in chats]
    generating_ms = min(1000 * u.generated_tokens / u.tokens_per_second for u in usages)
    assert max(u.queue_ms for u in usages) < generating_ms / 2, usages
    # Parked and resumed, the batch stream continues from its own cache (up to a near-tie, as batched).
    resumed_ids = [token for r in streamed for token in r.token_ids]
    assert resumed_ids[:12] == solo_ids[:12]
    assert streamed[-1].usage.generated_tokens == len(resumed_ids)


# The scheduler over the real decoder, in process: prefix reuse and prefill in pieces must not
# change what the model says.

NOTES = " ".join(f"Note {i}: the parcel left the depot on day {i} and reached the shop a day later." for i in range(26))


@pytest.fixture(scope="module")
def generation_parts(models_home: Path) -> tuple[Decoder, ModelTokenizer]:
    folder = artefact_dir(models_home, GENERATION_MODEL, GENERATION_VARIANT)
    return Decoder(folder, [CPU], 2, 2, 1024), ModelTokenizer.from_dir(folder)


async def generated_ids(engine: GenerationScheduler, prompt: list[int], max_new: int = 8,
                        priority: int = common_pb2.PRIORITY_STANDARD) -> tuple[list[int], Usage]:
    events = [event async for event in engine.submit(GenerationRequest(prompt, SamplingConfig(max_new), "t", priority))]
    usage = events[-1].usage
    assert usage is not None
    return [token for event in events for token in event.token_ids], usage


async def test_a_reused_prefix_and_a_prompt_prefilled_in_pieces_give_the_plain_output(
    generation_parts: tuple[Decoder, ModelTokenizer],
) -> None:
    decoder, tokenizer = generation_parts
    prompt = tokenizer.encode(f"{NOTES}\nSummary of the notes:").ids
    other = tokenizer.encode(f"{NOTES}\nThe last note says:").ids
    assert len(prompt) > 2 * PREFILL_CHUNK_TOKENS

    plain = GenerationScheduler(decoder, tokenizer, 4, 0, PrefixCache(0, 32))
    plain.start()
    solo, _ = await generated_ids(plain, prompt)
    other_solo, _ = await generated_ids(plain, other)
    # With a stream decoding, the prompt goes in pieces whose row rides along in the steps.
    streaming = plain.submit(GenerationRequest(tokenizer.encode("Once upon a time").ids, SamplingConfig(300), "t", 1))
    await anext(streaming)
    pieced, _ = await generated_ids(plain, prompt)
    await streaming.aclose()
    await plain.stop()

    cached = GenerationScheduler(decoder, tokenizer, 4, 0, PrefixCache(4096, 32))
    cached.start()
    await generated_ids(cached, prompt)
    reused, usage = await generated_ids(cached, other)
    await cached.stop()

    assert usage.cached_prompt_tokens > 2 * PREFILL_CHUNK_TOKENS
    assert reused == other_solo
    # Batched with another row, the int4 kernels may round a near-tie differently; up to there, equal.
    assert pieced[:6] == solo[:6]


async def test_cancelling_a_stream_frees_its_slot(client: InferenceClient) -> None:
    long = inference_pb2.GenerateRequest(
        prompt="Once upon a time", sampling=inference_pb2.SamplingParams(max_new_tokens=500), priority=common_pb2.PRIORITY_BATCH
    )
    call = client.generate(long, timeout_s=120)
    await anext(call)  # it holds the only non-reserved slot now
    await call.aclose()  # a reader that stops cancels the call
    started = time.monotonic()
    responses = await collect(
        client,
        inference_pb2.GenerateRequest(prompt="Hello", sampling=inference_pb2.SamplingParams(max_new_tokens=3),
                                      priority=common_pb2.PRIORITY_BATCH),
    )
    assert responses[-1].usage.queue_ms < 2000
    assert time.monotonic() - started < 10


async def test_a_full_queue_is_refused_with_a_retry_hint(client: InferenceClient, inference: RunningStack) -> None:
    # The hint is a trailer on the wire: these calls are raw, so the trailer can be read.
    async with grpc.aio.insecure_channel(inference.addr("inference")) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        def long_batch_call():  # type: ignore[no-untyped-def]
            return stub.Generate(
                inference_pb2.GenerateRequest(prompt="Once upon a time", priority=common_pb2.PRIORITY_BATCH,
                                              sampling=inference_pb2.SamplingParams(max_new_tokens=400)),
                metadata=ADMIN, timeout=120,
            )

        running = long_batch_call()
        await running.read()  # one batch request runs; the interactive slot stays free
        waiting = [long_batch_call() for _ in range(2)]
        await asyncio.sleep(0.5)
        refused = long_batch_call()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await refused.read()
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailing = dict(error.value.trailing_metadata() or ())
        assert int(trailing[RETRY_AFTER_MS_KEY]) > 0
        # Interactive work still gets the reserved slot while the queue is full.
        quick = await collect(client, inference_pb2.GenerateRequest(
            prompt="Hello", priority=common_pb2.PRIORITY_INTERACTIVE, sampling=inference_pb2.SamplingParams(max_new_tokens=2)))
        assert quick[-1].usage.generated_tokens == 2
        for call in (running, *waiting):
            call.cancel()


async def test_a_deadline_is_honoured(client: InferenceClient) -> None:
    request = inference_pb2.GenerateRequest(prompt="Once upon a time", sampling=inference_pb2.SamplingParams(max_new_tokens=500))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        async for _ in client.generate(request, timeout_s=0.5):
            pass
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({}, "input: set either prompt or messages"),
        ({"prompt": "  "}, "prompt: is empty"),
        ({"prompt": "word " * 2100}, "context window is 2048"),
        ({"prompt": "hi", "sampling": inference_pb2.SamplingParams(max_new_tokens=513)}, "sampling.max_new_tokens"),
        ({"prompt": "hi", "sampling": inference_pb2.SamplingParams(max_new_tokens=-1)}, "out of range 1..512"),
        ({"prompt": "hi", "sampling": inference_pb2.SamplingParams(top_p=1.5)}, "sampling.top_p"),
        ({"prompt": "hi", "model": "llama-70b"}, "model: unknown model"),
        ({"messages": inference_pb2.ChatMessages()}, "messages: at least one"),
        ({"messages": inference_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="robot", content="x")])},
         "messages[0].role"),
    ],
)
async def test_bad_generate_requests_are_invalid_argument(client: InferenceClient, request_fields: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidArgument) as error:
        await collect(client, inference_pb2.GenerateRequest(**request_fields))
    assert field in error.value.message


def test_the_served_graph_projects_the_last_position_only(models_home: Path, tmp_path: Path) -> None:
    """The build slices the hidden states before the vocabulary projection; the logits it gives
    are those of the builder's whole-sequence graph at the last position, alone and in a batch."""
    import onnx

    folder = artefact_dir(models_home, GENERATION_MODEL, GENERATION_VARIANT)
    served = onnx.load(folder / "model.onnx", load_external_data=False)
    assert [dim.dim_value for dim in next(o for o in served.graph.output if o.name == "logits").type.tensor_type.shape.dim][1] == 1

    # The builder's graph back: the projection reads the hidden states of every position again.
    whole = tmp_path / "whole"
    shutil.copytree(folder, whole)  # ONNX Runtime refuses weights linked from outside the model's folder
    sliced = next(node for node in served.graph.node if node.op_type == "Slice" and node.output[0].endswith("/last_position"))
    projection = next(node for node in served.graph.node if sliced.output[0] in node.input)
    projection.input[0] = sliced.input[0]
    served.graph.node.remove(sliced)
    logits = next(o for o in served.graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "sequence_length"
    onnx.save(served, whole / "model.onnx")

    tokenizer = ModelTokenizer.from_dir(folder)
    prompts = [tokenizer.encode(text).ids for text in ("What is the capital of France?", f"{NOTES}\nSummary of the notes:")]
    last_only, every = Decoder(folder, [CPU], 2, 2, 1024), Decoder(whole, [CPU], 2, 2, 1024)
    for row, prompt in enumerate(prompts):
        expected = every.prefill(row, prompt)
        assert np.allclose(last_only.prefill(row, prompt), expected, atol=1e-4)
    next_tokens = [int(np.argmax(last_only.prefill(row, prompt))) for row, prompt in enumerate(prompts)]
    lengths = [len(prompt) for prompt in prompts]
    assert np.allclose(last_only.decode(next_tokens, lengths), every.decode(next_tokens, lengths), atol=1e-4)
