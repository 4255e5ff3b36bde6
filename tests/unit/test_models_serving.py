"""Several generation models in one inference service (issue 15, item 1): loaded on first use
within a memory budget, the least recently used idle one unloaded, a busy budget refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from llmos.v1 import inference_pb2
from services.inference.core import GenerationModel, GenerationModels
from services.inference.model_pool import ModelCandidate, ServedModel

pytestmark = pytest.mark.unit

MIB = 1 << 20


class Scheduler:
    """Stands in for GenerationScheduler: what GenerationModels does with it is start and stop it."""

    def __init__(self) -> None:
        self.running = False

    def start(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running = False


def served(name: str) -> ServedModel:
    return ServedModel(name, inference_pb2.MODEL_ROLE_GENERATION, "cpu-int4", Path("/nowhere") / name, "", 2048, 0, 2, "test")


class Models:
    def __init__(self, sizes_mib: dict[str, int]) -> None:
        self.candidates = {name: ModelCandidate(served(name), size * MIB) for name, size in sizes_mib.items()}
        self.loads: list[str] = []
        self.schedulers: dict[str, Scheduler] = {}

    def load(self, candidate: ModelCandidate) -> GenerationModel:
        self.loads.append(candidate.served.name)
        scheduler = self.schedulers[candidate.served.name] = Scheduler()
        return GenerationModel(candidate.served, scheduler, None, True, candidate.nbytes)  # type: ignore[arg-type]


def pool(models: Models, budget_mib: int) -> GenerationModels:
    return GenerationModels("smollm2", lambda: models.candidates, models.load, budget_mib * MIB)


async def test_models_load_on_first_use_and_the_least_recently_used_idle_one_makes_room() -> None:
    models = Models({"smollm2": 900, "gemma": 1200, "third": 1000})
    generation = pool(models, 2500)
    async with generation.use("") as default:
        assert default.served.name == "smollm2"
    async with generation.use("gemma"):
        pass
    assert models.loads == ["smollm2", "gemma"] and list(generation.loaded) == ["smollm2", "gemma"]
    async with generation.use("smollm2"):  # now gemma is the least recently used
        pass
    async with generation.use("third"):
        pass
    assert models.loads == ["smollm2", "gemma", "third"]
    assert list(generation.loaded) == ["smollm2", "third"] and not models.schedulers["gemma"].running
    states = {info.name: info.state for info in generation.infos()}
    assert states == {"smollm2": inference_pb2.MODEL_STATE_LOADED, "third": inference_pb2.MODEL_STATE_LOADED,
                      "gemma": inference_pb2.MODEL_STATE_AVAILABLE}


async def test_a_model_in_use_is_not_unloaded_and_the_request_that_needs_its_room_is_refused() -> None:
    models = Models({"smollm2": 900, "gemma": 1200})
    generation = pool(models, 2000)
    async with generation.use("smollm2"):
        with pytest.raises(ResourceExhausted, match="smollm2 serve other requests .retry after 2.0 s."):
            async with generation.use("gemma"):
                pass
        assert models.schedulers["smollm2"].running
    async with generation.use("gemma"):  # once idle, it makes room
        assert list(generation.loaded) == ["gemma"]


async def test_unknown_and_oversized_models_are_refused_with_the_reason() -> None:
    models = Models({"smollm2": 900, "huge": 9000})
    generation = pool(models, 2000)
    with pytest.raises(InvalidArgument, match="unknown model 'gpt-4'; generation models: huge, smollm2"):
        async with generation.use("gpt-4"):
            pass
    with pytest.raises(FailedPrecondition, match="LLMOS_INFERENCE_GENERATION_MEMORY_MB"):
        async with generation.use("huge"):
            pass
    await generation.close()
    assert not generation.loaded
