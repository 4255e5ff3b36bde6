"""Several embedding models in one inference service (issue 15, item 1): Embed's model selects
one, an added model loads on first use within its budget and the least recently used idle one
is unloaded, while the default (the knowledge base's) stays loaded, uncounted, and embeds every
chunk."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from llmos.bus.subjects import CHUNKS_EMBEDDED
from llmos.errors import InvalidArgument, ResourceExhausted
from llmos.testing import MemoryPublisher
from llmos.v1 import common_pb2, events_pb2, inference_pb2
from services.inference.batching import EmbedBatcher
from services.inference.core import EmbeddingModels, EmbedLimits, GenerationModels, InferenceCore, LoadedEmbeddingModel
from services.inference.model_pool import ModelCandidate, ServedModel

pytestmark = pytest.mark.unit

MIB = 1 << 20
DEFAULT = "all-minilm-l6-v2"


class Encoder:
    """Stands in for EmbeddingModel: every vector of model number `mark` is `mark` repeated
    `dimensions` times, so a vector tells which model made it."""

    def __init__(self, mark: float, dimensions: int) -> None:
        self.mark, self.dimensions = mark, dimensions

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(text.split()) for text in texts]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.full((len(texts), self.dimensions), self.mark, dtype=np.float32)


class Models:
    def __init__(self, sizes_mib: dict[str, tuple[int, int]]) -> None:
        """sizes_mib: name -> (footprint in MiB, dimensions)."""
        self.candidates = {
            name: ModelCandidate(
                ServedModel(name, inference_pb2.MODEL_ROLE_EMBEDDING, "fp32", Path("/nowhere") / name, "", 256, dimensions, 2, "test"),
                size * MIB,
            )
            for name, (size, dimensions) in sizes_mib.items()
        }
        self.marks = {name: float(number) for number, name in enumerate(sizes_mib, start=1)}
        self.loads: list[str] = []
        self.batchers: dict[str, EmbedBatcher] = {}

    def load(self, candidate: ModelCandidate) -> LoadedEmbeddingModel:
        name = candidate.served.name
        self.loads.append(name)
        encoder = Encoder(self.marks[name], candidate.served.dimensions)
        batcher = self.batchers[name] = EmbedBatcher(encoder.embed, 8, 1024, 0.001, 64)
        return LoadedEmbeddingModel(candidate.served, encoder, batcher, candidate.nbytes)  # type: ignore[arg-type]


async def serving(models: Models, budget_mib: int) -> tuple[InferenceCore, MemoryPublisher]:
    embeddings = EmbeddingModels(DEFAULT, lambda: models.candidates, models.load, budget_mib * MIB, keep_default_loaded=True)
    await embeddings.load(DEFAULT)
    publisher = MemoryPublisher()
    no_generation = GenerationModels("none", dict, models.load, 0)  # type: ignore[arg-type]
    core = InferenceCore(publisher, embeddings, EmbedLimits(16, 1000), no_generation, 16, 16)
    return core, publisher


def states(core: InferenceCore) -> dict[str, int]:
    return {info.name: info.state for info in core.list_models() if info.role == inference_pb2.MODEL_ROLE_EMBEDDING}


async def test_the_model_named_embeds_and_added_models_share_a_budget_the_default_is_not_counted_in() -> None:
    # The default alone is over the budget: it does not count; the added ones fit one at a time.
    models = Models({DEFAULT: (900, 384), "tiny": (300, 128), "small": (300, 96)})
    core, _ = await serving(models, 500)
    assert states(core) == {DEFAULT: inference_pb2.MODEL_STATE_LOADED, "small": inference_pb2.MODEL_STATE_AVAILABLE,
                            "tiny": inference_pb2.MODEL_STATE_AVAILABLE}

    default = await core.embed("", ["a text"], common_pb2.PRIORITY_INTERACTIVE)
    assert (default.model, default.vectors.shape, default.vectors[0, 0]) == (DEFAULT, (1, 384), 1.0)
    tiny = await core.embed("tiny", ["one", "two words"], common_pb2.PRIORITY_INTERACTIVE)
    assert (tiny.model, tiny.vectors.shape, tiny.vectors[0, 0], tiny.prompt_tokens) == ("tiny", (2, 128), 2.0, 3)
    assert states(core)["tiny"] == inference_pb2.MODEL_STATE_LOADED

    small = await core.embed("small", ["x"], common_pb2.PRIORITY_STANDARD)  # tiny, idle, makes room
    assert (small.model, small.vectors.shape, small.vectors[0, 0]) == ("small", (1, 96), 3.0)
    assert models.loads == [DEFAULT, "tiny", "small"]
    assert states(core) == {DEFAULT: inference_pb2.MODEL_STATE_LOADED, "small": inference_pb2.MODEL_STATE_LOADED,
                            "tiny": inference_pb2.MODEL_STATE_AVAILABLE}
    assert not any(task for task in models.batchers["tiny"]._tasks if not task.done())  # its batcher stopped

    named_default = await core.embed(DEFAULT, ["x"], common_pb2.PRIORITY_STANDARD)
    assert named_default.model == DEFAULT and models.loads == [DEFAULT, "tiny", "small"]
    await core.embeddings.close()


async def test_chunks_are_embedded_by_the_default_model_whatever_requests_asked_for() -> None:
    models = Models({DEFAULT: (90, 384), "tiny": (30, 128)})
    core, publisher = await serving(models, 100)
    await core.embed("tiny", ["x"], common_pb2.PRIORITY_INTERACTIVE)
    chunk = common_pb2.Chunk(chunk_id="c1", text="chunk text")
    await core.embed_chunks(events_pb2.ChunksCreated(document_id="d1", tenant="acme", content_hash="h", chunks=[chunk]))
    ((subject, embedded),) = publisher.published
    assert subject == CHUNKS_EMBEDDED and isinstance(embedded, events_pb2.ChunksEmbedded)
    assert embedded.model == DEFAULT and len(embedded.chunks[0].vector) == 384 and embedded.chunks[0].vector[0] == 1.0
    await core.embeddings.close()


async def test_unknown_and_busy_models_are_refused_naming_the_models() -> None:
    models = Models({DEFAULT: (90, 384), "tiny": (60, 128), "small": (60, 96)})
    core, _ = await serving(models, 100)
    with pytest.raises(InvalidArgument, match=f"model: unknown model 'gpt-4'; embedding models: {DEFAULT}, small, tiny"):
        await core.embed("gpt-4", ["x"], common_pb2.PRIORITY_INTERACTIVE)
    async with core.embeddings.use("tiny"):
        with pytest.raises(ResourceExhausted, match="'small' does not fit in the embedding memory budget while tiny serve"):
            await core.embed("small", ["x"], common_pb2.PRIORITY_INTERACTIVE)
        async with core.embeddings.use(""):  # the default serves on, outside the budget
            pass
    assert (await core.embed("small", ["x"], common_pb2.PRIORITY_INTERACTIVE)).model == "small"
    await core.embeddings.close()
    assert not core.embeddings.loaded
