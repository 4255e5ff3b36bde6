"""Read side of the model cache: what services call to find built artefacts.

Nothing here imports a build tool, so serving processes can use it freely.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmos.errors import FailedPrecondition, NotFound
from llmos.models.catalog import CATALOG, get_spec, models_root
from llmos.models.errors import ModelsNotBuilt
from llmos.models.manifest import (
    MANIFEST_NAME,
    ModelsManifest,
    artefact_problems,
    read_artefact_manifest,
    write_json_atomic,
)

REGISTRY_NAME = "registry.json"  # models people added (llmos.models.registry)

# Variants that need an opt-in flag of `llmos models build`; the rest are built by default.
_BUILD_FLAGS = {"cuda-fp16": "--cuda", "int8": "--int8"}


def _build_command(variant: str) -> str:
    """The command that builds `variant`, for error messages."""
    flag = _BUILD_FLAGS.get(variant)
    return f"llmos models build {flag}" if flag else "llmos models build"


def artefact_dir(home: Path, name: str, variant: str | None = None) -> Path:
    """The folder of a built artefact; `variant` defaults to the model's default variant.

    Checks file presence and sizes against the manifest (cheap); full hashes are the build's job.
    """
    spec = get_spec(name)
    variant = variant or spec.default_variant
    folder = spec.folder(home, variant)
    problems = artefact_problems(folder, check_hashes=False)
    if problems:
        raise ModelsNotBuilt(
            f"model {name} ({variant}) is not built in {folder}: {problems[0]}; "
            f"run `{_build_command(variant)}`"
        )
    return folder


def models_built(home: Path) -> bool:
    """True when every model's default artefact is present (what `llmos up` needs)."""
    return all(
        not artefact_problems(spec.folder(home, spec.default_variant), check_hashes=False)
        for spec in CATALOG.values()
    )


def load_manifest(home: Path) -> ModelsManifest:
    """The index of built artefacts under `home`."""
    path = models_root(home) / MANIFEST_NAME
    try:
        return ModelsManifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ModelsNotBuilt(f"no models are built under {home}; run `llmos models build`") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelsNotBuilt(
            f"{path} is malformed ({exc}); run `llmos models build` to rewrite it"
        ) from exc


def refresh_index(home: Path) -> ModelsManifest:
    """Rewrite the index from the artefact folders that are complete on disk (the catalog's and
    the added models')."""
    folders = [spec.folder(home, variant) for spec in CATALOG.values() for variant in spec.variants]
    folders += [model.folder(home) for model in registered_models(home).values()]
    artefacts = [read_artefact_manifest(folder) for folder in folders if not artefact_problems(folder, check_hashes=False)]
    index = ModelsManifest(tuple(artefacts))
    root = models_root(home)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / MANIFEST_NAME, index.to_dict())
    return index


@dataclass(frozen=True)
class RegisteredModel:
    """A model someone added, as its checkpoint declared it."""

    name: str
    role: str
    variant: str
    source_format: str  # gguf or hf
    source: str  # the checkpoint's absolute path when it was added
    sha256: str  # of the GGUF file; of a folder, over its files' paths and hashes
    architecture: str
    licence: str
    chat_template: str | None
    context_length: int
    added_at: str

    def folder(self, home: Path) -> Path:
        return models_root(home) / self.name / self.variant

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def registry_path(home: Path) -> Path:
    return models_root(home) / REGISTRY_NAME


def registered_models(home: Path) -> dict[str, RegisteredModel]:
    """The models people added, by name."""
    path = registry_path(home)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {entry["name"]: RegisteredModel(**entry) for entry in data["models"]}
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FailedPrecondition(f"{path} is malformed ({exc}); remove it and add the models again") from None


def registered_model(home: Path, name: str) -> RegisteredModel:
    """An added model by name; NotFound naming every known model."""
    models = registered_models(home)
    try:
        return models[name]
    except KeyError:
        known = ", ".join([*CATALOG, *models])
        raise NotFound(f"no model {name!r}; known models: {known} (`llmos models add` adds one)") from None


def added_artefact_dir(home: Path, name: str) -> tuple[RegisteredModel, Path]:
    """An added model and its artefact folder, checked like artefact_dir checks the catalog's."""
    model = registered_model(home, name)
    folder = model.folder(home)
    problems = artefact_problems(folder, check_hashes=False)
    if problems:
        raise ModelsNotBuilt(f"model {name} ({model.variant}) is damaged in {folder}: {problems[0]}; remove and add it again")
    return model, folder
