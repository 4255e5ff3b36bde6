"""Embeddings over gRPC and the chunk consumer, against a real nats-server and the built models."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from llmos.bus.subjects import CHUNKS_CREATED, CHUNKS_EMBEDDED
from llmos.clients import InferenceClient
from llmos.errors import InvalidArgument, PermissionDenied
from llmos.models.catalog import get_spec, locate_source
from llmos.models.store import artefact_dir
from llmos.stack import stop_pids, wait_until_serving
from llmos.v1 import common_pb2, events_pb2, inference_pb2
from tests.conftest import NatsServer, RunningStack, _settings_from, platform_environment
from tests.grpc_helpers import GLOBEX_USER, call_with_raw_bytes, connected
from tests.integration.bus_helpers import last_message, last_sequence, messages_after, publish

pytestmark = pytest.mark.integration

SENTENCES = [
    "Returns are free within 30 days of delivery.",
    "Refunds reach your card within five working days after we receive the parcel.",
    "How do I reset my password?",
    "Le colis est arrivé endommagé — que faire ?",
    "ok",
]


def start_inference(nats: NatsServer, models_home: Path, home: Path, overrides: dict[str, str]) -> Iterator[RunningStack]:
    """The inference service alone, as a real process, with setting overrides."""
    (home / "models").symlink_to(models_home / "models", target_is_directory=True)
    env = {**platform_environment(nats, home), **overrides}
    settings = _settings_from(env)
    (home / "logs").mkdir()
    with (home / "logs" / "inference.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.inference"], cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until_serving(settings, {"inference": process}, timeout_s=120)
        yield RunningStack(env, settings, home)
    finally:
        stop_pids([process.pid], timeout_s=15)


@pytest.fixture(scope="module")
def inference(nats_server: NatsServer, models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    yield from start_inference(nats_server, models_home, tmp_path_factory.mktemp("inference-embed"), {})


@pytest.fixture
async def client(inference: RunningStack) -> AsyncIterator[InferenceClient]:
    async with connected(inference, InferenceClient) as inference_client:
        yield inference_client


def reference_vectors(source: Path, texts: list[str], max_length: int = 256) -> np.ndarray:
    """Mean-pooled, normalized vectors from a sentence-transformers checkpoint folder itself (its
    tokenizer, torch), as sentence-transformers computes them for all-MiniLM-L6-v2's modules."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


async def test_embed_matches_the_checkpoint(client: InferenceClient) -> None:
    response = await client.embed_response(SENTENCES, timeout_s=60)
    assert response.model == "all-minilm-l6-v2" and response.dimensions == 384
    vectors = np.array([embedding.values for embedding in response.embeddings], dtype=np.float32)
    assert vectors.shape == (len(SENTENCES), 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    reference = reference_vectors(locate_source(get_spec("all-minilm-l6-v2")).path, SENTENCES)
    cosine = (vectors * reference).sum(axis=1)
    assert cosine.min() > 0.9999, cosine
    assert response.prompt_tokens > len(SENTENCES)


async def test_concurrent_calls_are_batched_and_keep_their_order(client: InferenceClient) -> None:
    alone = await client.embed(SENTENCES, 60)
    together = await asyncio.gather(*(client.embed([text], 60, priority=common_pb2.PRIORITY_BATCH) for text in SENTENCES))
    for single, expected in zip(together, alone, strict=True):
        assert np.allclose(single[0], expected, atol=1e-5)


async def test_list_models_reports_what_is_served(client: InferenceClient, models_home: Path) -> None:
    from llmos.models.manifest import read_artefact_manifest

    models = {model.name: model for model in await client.models(timeout_s=10)}
    embedding, generation = models["all-minilm-l6-v2"], models["smollm2-135m-instruct"]
    assert embedding.role == inference_pb2.MODEL_ROLE_EMBEDDING and embedding.dimensions == 384
    assert generation.role == inference_pb2.MODEL_ROLE_GENERATION and generation.context_length == 2048
    assert generation.variant == "cpu-int4" and embedding.variant == "fp32"
    for model in (embedding, generation):
        assert model.execution_provider == "CPUExecutionProvider" and model.intra_op_threads > 0
        manifest = read_artefact_manifest(artefact_dir(models_home, model.name, model.variant))
        assert model.sha256 == next(f.sha256 for f in manifest.files if f.path == "model.onnx")
        assert model.source_package == manifest.source_package


@pytest.mark.parametrize(
    ("texts", "model", "field"),
    [
        ([], "", "texts: at least 1"),
        (["x"] * 257, "", "texts: 257 texts is over the limit of 256"),
        (["fine", "  "], "", "texts[1]: is empty"),
        (["x"], "gpt-4", "model: unknown model"),
    ],
)
async def test_bad_embed_requests_are_invalid_argument(client: InferenceClient, texts: list[str], model: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        await client.embed(texts, 10, model=model)
    assert field in error.value.message


async def test_non_utf8_text_is_invalid_argument(inference: RunningStack) -> None:
    # Field 2 (texts), length-delimited, with bytes that are not UTF-8: what a buggy client sends.
    error = await call_with_raw_bytes(inference.addr("inference"), "/llmos.v1.InferenceService/Embed", b"\x12\x03\xff\xfe\x41")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in error.details()


async def test_other_tenants_are_refused(client: InferenceClient) -> None:
    with pytest.raises(PermissionDenied):
        await client.with_credentials(GLOBEX_USER).embed(["x"], 10, tenant="acme")


def chunks_created(document_id: str, priority: int, texts: list[str]) -> events_pb2.ChunksCreated:
    return events_pb2.ChunksCreated(
        document_id=document_id,
        tenant="acme",
        content_hash=f"hash-{document_id}",
        priority=priority,
        chunks=[
            common_pb2.Chunk(chunk_id=f"{document_id}-{index}", document_id=document_id, tenant="acme", index=index, text=text)
            for index, text in enumerate(texts)
        ],
    )


@pytest.mark.parametrize("priority", [common_pb2.PRIORITY_BATCH, common_pb2.PRIORITY_INTERACTIVE])
async def test_chunks_are_embedded_once_despite_redelivery(client: InferenceClient, inference: RunningStack, priority: int) -> None:
    url = inference.settings.nats_url
    document_id = f"doc-{priority}"
    created = chunks_created(document_id, priority, SENTENCES[:3])
    before = await last_sequence(url, CHUNKS_EMBEDDED)
    # The same message twice with distinct ids, as a redelivery after a crash would look.
    await publish(url, CHUNKS_CREATED, created.SerializeToString(), headers={"Nats-Msg-Id": f"{document_id}-1"})
    await publish(url, CHUNKS_CREATED, created.SerializeToString(), headers={"Nats-Msg-Id": f"{document_id}-2"})
    message = events_pb2.ChunksEmbedded.FromString((await last_message(url, CHUNKS_EMBEDDED, after_seq=before)).data)
    assert (message.document_id, message.tenant, message.content_hash) == (document_id, "acme", f"hash-{document_id}")
    assert [c.chunk.chunk_id for c in message.chunks] == [f"{document_id}-{i}" for i in range(3)]
    expected = await client.embed(SENTENCES[:3], 60)
    for embedded, reference in zip(message.chunks, expected, strict=True):
        assert np.allclose(embedded.vector, reference, atol=1e-5)
    await asyncio.sleep(1.0)  # time for the duplicate to be handled
    published = [m for m in map(events_pb2.ChunksEmbedded.FromString, await messages_after(url, CHUNKS_EMBEDDED, before))
                 if m.document_id == document_id]
    assert len(published) == 1


async def test_a_bad_chunk_message_is_dead_lettered_and_the_consumer_goes_on(client: InferenceClient, inference: RunningStack) -> None:
    from llmos.bus.subjects import dead_letter_subject

    url = inference.settings.nats_url
    dlq = dead_letter_subject(CHUNKS_CREATED)
    before_dlq = await last_sequence(url, dlq)
    bad = chunks_created("doc-bad", common_pb2.PRIORITY_STANDARD, ["fine", "   "])
    await publish(url, CHUNKS_CREATED, bad.SerializeToString())
    letter = events_pb2.DeadLetter.FromString((await last_message(url, dlq, after_seq=before_dlq)).data)
    assert "chunks[1].text" in letter.error
    before = await last_sequence(url, CHUNKS_EMBEDDED)
    await publish(url, CHUNKS_CREATED, chunks_created("doc-after-bad", common_pb2.PRIORITY_STANDARD, ["still here"]).SerializeToString())
    message = events_pb2.ChunksEmbedded.FromString((await last_message(url, CHUNKS_EMBEDDED, after_seq=before)).data)
    assert message.document_id == "doc-after-bad"
