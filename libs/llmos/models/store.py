"""Read side of the model cache: what services call to find built artefacts.

Nothing here imports a build tool, so serving processes can use it freely.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmos.models.catalog import CATALOG, get_spec, models_root
from llmos.models.errors import ModelsNotBuilt
from llmos.models.manifest import (
    MANIFEST_NAME,
    ArtefactManifest,
    ModelsManifest,
    artefact_problems,
    read_artefact_manifest,
    write_json_atomic,
)

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
    """Rewrite the index from the artefact folders that are complete on disk."""
    artefacts: list[ArtefactManifest] = []
    for spec in CATALOG.values():
        for variant in spec.variants:
            folder = spec.folder(home, variant)
            if not artefact_problems(folder, check_hashes=False):
                artefacts.append(read_artefact_manifest(folder))
    index = ModelsManifest(tuple(artefacts))
    root = models_root(home)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / MANIFEST_NAME, index.to_dict())
    return index
