"""Manifests of built artefacts: what was built, from what, by which tools, and file hashes.

Each artefact folder holds a `manifest.json`; `<home>/models/manifest.json` indexes them all.
The hashes make builds idempotent: an artefact whose files still match is not rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """One file of an artefact; `path` is relative to the artefact folder, with `/` separators."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ArtefactManifest:
    """Provenance and content of one artefact folder."""

    name: str
    variant: str
    role: str
    source_package: str
    source_version: str
    licence: str
    builders: dict[str, str]
    built_at: str
    files: tuple[FileEntry, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtefactManifest:
        fields = dict(data)
        fields["files"] = tuple(FileEntry(**entry) for entry in data["files"])
        fields["builders"] = dict(data["builders"])
        return cls(**fields)


@dataclass(frozen=True)
class ModelsManifest:
    """The index of every built artefact under one home."""

    artefacts: tuple[ArtefactManifest, ...]

    def find(self, name: str, variant: str) -> ArtefactManifest | None:
        for artefact in self.artefacts:
            if (artefact.name, artefact.variant) == (name, variant):
                return artefact
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "artefacts": [artefact.to_dict() for artefact in self.artefacts],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelsManifest:
        return cls(tuple(ArtefactManifest.from_dict(a) for a in data["artefacts"]))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path) -> tuple[FileEntry, ...]:
    """Hash every file under `folder` except the manifest itself, in a stable order."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    return tuple(
        FileEntry(p.relative_to(folder).as_posix(), sha256_file(p), p.stat().st_size)
        for p in paths
    )


def read_artefact_manifest(folder: Path) -> ArtefactManifest:
    """Raises OSError when the manifest is missing, ValueError when it is malformed."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        return ArtefactManifest.from_dict(data)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{folder / MANIFEST_NAME} is malformed: {exc}") from exc


def artefact_problems(folder: Path, *, check_hashes: bool) -> list[str]:
    """Why `folder` is not a complete artefact (empty list when it is).

    Sizes are cheap and catch truncation; hashes (check_hashes=True) also catch changed content.
    """
    try:
        manifest = read_artefact_manifest(folder)
    except OSError:
        return [f"{folder / MANIFEST_NAME} is missing"]
    except ValueError as exc:
        return [str(exc)]
    return [problem for entry in manifest.files if (problem := _file_problem(folder, entry, check_hashes))]


def _file_problem(folder: Path, entry: FileEntry, check_hash: bool) -> str | None:
    path = folder / entry.path
    if not path.is_file():
        return f"{entry.path} is missing"
    if path.stat().st_size != entry.size:
        return f"{entry.path} has {path.stat().st_size} bytes, the manifest says {entry.size}"
    if check_hash and sha256_file(path) != entry.sha256:
        return f"{entry.path} does not match its sha256 in the manifest"
    return None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that readers see either the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
