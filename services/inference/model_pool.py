"""Models of one role held in memory by name: loaded on first use within a memory budget, the
least recently used idle one unloaded to make room.

Generation models (their schedulers) and embedding models (their sessions and batchers) share
this; each role says what its models are and which setting sets its budget.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, Protocol, TypeVar

from llmos.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from llmos.models.manifest import read_artefact_manifest
from llmos.v1 import inference_pb2

# When every loaded model is busy and another must load, about one short generation's time.
BUSY_MODEL_RETRY_S = 2.0


@dataclass(frozen=True)
class ServedModel:
    """What ListModels reports about one model (its provider and threads once loaded)."""

    name: str
    role: inference_pb2.ModelRole.ValueType
    variant: str
    folder: Path
    execution_provider: str
    context_length: int
    dimensions: int
    threads: int
    source: str  # the package of a catalog model, gguf:/hf:<path> of an added one

    def info(self, state: inference_pb2.ModelState.ValueType = inference_pb2.MODEL_STATE_LOADED) -> inference_pb2.ModelInfo:
        try:
            files = read_artefact_manifest(self.folder).files
        except (OSError, ValueError):  # unreadable now: the model was loaded, or listed, from it before
            files = ()
        sha256 = next((entry.sha256 for entry in files if entry.path == "model.onnx"), "")
        return inference_pb2.ModelInfo(
            name=self.name,
            role=self.role,
            variant=self.variant,
            execution_provider=self.execution_provider,
            context_length=self.context_length,
            dimensions=self.dimensions,
            intra_op_threads=self.threads,
            source_package=self.source,
            sha256=sha256,
            state=state,
        )


@dataclass(frozen=True)
class ModelCandidate:
    """A built model the service may load: what ListModels says before it is loaded."""

    served: ServedModel
    nbytes: int  # estimated memory once loaded


class PooledModel(Protocol):
    """A model in memory: started once loaded, stopped (its workers ended) when unloaded."""

    @property
    def served(self) -> ServedModel: ...

    @property
    def nbytes(self) -> int: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...


ModelT = TypeVar("ModelT", bound=PooledModel)


class ModelPool(Generic[ModelT]):
    """Models by name, loaded on first use within `budget_bytes`.

    When a model does not fit beside the loaded ones, the least recently used model that no
    request is using is unloaded; when every loaded model is in use, the request is refused with
    RESOURCE_EXHAUSTED rather than waiting. `default` serves requests that name no model; with
    `keep_default_loaded` it is never unloaded and not counted in the budget (it must be loaded
    by the caller at start).
    """

    ROLE: ClassVar[str]
    BUDGET_SETTING: ClassVar[str]

    def __init__(
        self,
        default: str,
        candidates: Callable[[], dict[str, ModelCandidate]],
        load: Callable[[ModelCandidate], ModelT],
        budget_bytes: int,
        keep_default_loaded: bool = False,
    ) -> None:
        self.default = default
        self._candidates = candidates
        self._load = load
        self._budget_bytes = budget_bytes
        self._pinned = {default} if keep_default_loaded else set()
        self._loaded: OrderedDict[str, ModelT] = OrderedDict()  # least recently used first
        self._in_use: Counter[str] = Counter()
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> dict[str, ModelT]:
        return dict(self._loaded)

    @property
    def default_model(self) -> ModelT:
        """The default model, which must be loaded (kept loaded, or loaded just before)."""
        return self._loaded[self.default]

    def _candidate(self, name: str) -> ModelCandidate:
        candidates = self._candidates()
        if name not in candidates:
            raise InvalidArgument("model", f"unknown model {name!r}; {self.ROLE} models: {', '.join(sorted(candidates))}")
        return candidates[name]

    async def load(self, name: str) -> ModelT:
        """`name` in memory (loading it, and unloading others to make room, if need be)."""
        model = self._loaded.get(name)
        if model is None:
            # A load takes seconds: only requests for models not loaded wait for it.
            async with self._lock:
                model = self._loaded.get(name) or await self._load_within_budget(name)
        self._loaded.move_to_end(name)
        return model

    async def _load_within_budget(self, name: str) -> ModelT:
        candidate = self._candidate(name)
        if name not in self._pinned and candidate.nbytes > self._budget_bytes:
            raise FailedPrecondition(
                f"model {name!r} needs about {candidate.nbytes >> 20} MiB, more than the whole {self.ROLE} "
                f"memory budget of {self._budget_bytes >> 20} MiB ({self.BUDGET_SETTING})"
            )
        if name not in self._pinned:
            await self._make_room(name, candidate.nbytes)
        model = await asyncio.to_thread(self._load, candidate)
        model.start()
        self._loaded[name] = model
        return model

    async def _make_room(self, name: str, nbytes: int) -> None:
        while sum(model.nbytes for loaded, model in self._loaded.items() if loaded not in self._pinned) + nbytes > self._budget_bytes:
            idle = next((loaded for loaded in self._loaded if loaded not in self._pinned and not self._in_use[loaded]), None)
            if idle is None:
                busy = [loaded for loaded in self._loaded if loaded not in self._pinned]
                raise ResourceExhausted(
                    f"model {name!r} does not fit in the {self.ROLE} memory budget while "
                    f"{', '.join(busy)} serve other requests",
                    BUSY_MODEL_RETRY_S,
                )
            await self._loaded.pop(idle).stop()

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[ModelT]:
        """The model named (empty: the default), kept loaded while the caller holds it."""
        name = name or self.default
        model = await self.load(name)
        self._in_use[name] += 1
        try:
            yield model
        finally:
            self._in_use[name] -= 1

    def infos(self) -> list[inference_pb2.ModelInfo]:
        loaded = [model.served.info(inference_pb2.MODEL_STATE_LOADED) for model in self._loaded.values()]
        available = [
            candidate.served.info(inference_pb2.MODEL_STATE_AVAILABLE)
            for name, candidate in sorted(self._candidates().items())
            if name not in self._loaded
        ]
        return loaded + available

    async def close(self) -> None:
        async with self._lock:
            while self._loaded:
                await self._loaded.popitem()[1].stop()
