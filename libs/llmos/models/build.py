"""`llmos models build`: turn packaged weights into served artefacts, once.

Each artefact is built into a staging folder next to its target and renamed into place only
when complete, so an interrupted build never leaves half an artefact. An artefact whose files
still match its manifest (sha256) and whose source package is unchanged is not rebuilt.
Build tools (torch, transformers, the genai model builder) are imported by the exporters only.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from llmos.models import export_embedding, export_genai, export_kokoro
from llmos.models.catalog import CATALOG, ModelSpec, Role, SourceFiles, locate_source, models_root
from llmos.models.manifest import (
    MANIFEST_NAME,
    ArtefactManifest,
    ModelsManifest,
    artefact_problems,
    describe_files,
    read_artefact_manifest,
    write_json_atomic,
)
from llmos.models.store import refresh_index

Log = Callable[[str], None]
# (source weights, folder to fill, scratch folder for intermediates, log)
ArtefactBuilder = Callable[[SourceFiles, Path, Path, Log], None]

BUILDERS: dict[tuple[str, str], ArtefactBuilder] = {
    ("smollm2-135m-instruct", "cpu-int4"): export_genai.build_cpu_int4,
    ("smollm2-135m-instruct", "cuda-fp16"): export_genai.build_cuda_fp16,
    ("all-minilm-l6-v2", "fp32"): export_embedding.build_fp32,
    ("all-minilm-l6-v2", "int8"): export_embedding.build_int8,
    ("kokoro-82m", "onnx-int8"): export_kokoro.build_int8,
}

# Versions recorded in each manifest, so an artefact can be traced to the tools that made it.
# Where the gpu extra replaced the CPU packages, their CUDA builds are the ones installed.
TOOL_PACKAGES = ("torch", "transformers", "onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime", "onnxruntime-gpu",
                 "onnx", "gguf", "tokenizers")

_LOCK_NAME = ".build.lock"
_STAGING = "building"
_RETIRED = "old"


def build_models(
    home: Path,
    *,
    cuda: bool = False,
    int8: bool = False,
    force: bool = False,
    log: Log = print,
) -> ModelsManifest:
    """Build every missing, damaged or stale artefact (all of them with `force`); return the index.

    Default artefacts: SmolLM2 int4 for CPU and MiniLM fp32. `cuda` adds SmolLM2 fp16 for CUDA,
    `int8` adds a dynamically quantized MiniLM.
    """
    root = models_root(home)
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_builds(root, log):
        try:
            for spec, variant in _wanted(cuda=cuda, int8=int8):
                _ensure_artefact(home, spec, variant, force=force, log=log)
        finally:
            index = refresh_index(home)  # list what did get built, even when a later one failed
    return index


def _wanted(*, cuda: bool, int8: bool) -> Iterator[tuple[ModelSpec, str]]:
    opted_in = {"cuda-fp16": cuda, "int8": int8}
    for spec in CATALOG.values():
        for variant in spec.variants:
            if variant == spec.default_variant or opted_in.get(variant, False):
                yield spec, variant


def _ensure_artefact(home: Path, spec: ModelSpec, variant: str, *, force: bool, log: Log) -> None:
    label = f"{spec.name}/{variant}"
    folder = spec.folder(home, variant)
    source = locate_source(spec)
    reason = "forced" if force else _stale_reason(folder, source)
    if reason is None:
        log(f"{label}: up to date")
        return
    log(f"{label}: building ({reason})")
    started = time.monotonic()
    with staging_folder(folder) as (staging, scratch):
        BUILDERS[(spec.name, variant)](source, staging, scratch, log)
        manifest = _manifest_for(spec, variant, source, staging)
        write_json_atomic(staging / MANIFEST_NAME, manifest.to_dict())
    size_mb = sum(entry.size for entry in manifest.files) / 1e6
    log(f"{label}: built in {time.monotonic() - started:.1f} s, {size_mb:.1f} MB in {folder}")


def _stale_reason(folder: Path, source: SourceFiles) -> str | None:
    """Why the artefact in `folder` must be (re)built, or None when it is current."""
    if not folder.exists():
        return "not built yet"
    problems = artefact_problems(folder, check_hashes=True)
    if problems:
        return problems[0]
    built_from = read_artefact_manifest(folder).source_version
    if built_from != source.version:
        return f"{source.package} changed from {built_from} to {source.version}"
    return None


def _manifest_for(spec: ModelSpec, variant: str, source: SourceFiles, folder: Path) -> ArtefactManifest:
    return manifest_of(spec.name, variant, spec.role, source.package, source.version, spec.licence, folder)


def manifest_of(
    name: str, variant: str, role: Role, source_package: str, source_version: str, licence: str, folder: Path
) -> ArtefactManifest:
    """The manifest of the artefact built in `folder`: provenance, tool versions, file hashes."""
    return ArtefactManifest(
        name=name,
        variant=variant,
        role=role.value,
        source_package=source_package,
        source_version=source_version,
        licence=licence,
        builders=_tool_versions(),
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        files=describe_files(folder),
    )


def _tool_versions() -> dict[str, str]:
    versions = {}
    for package in TOOL_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@contextmanager
def staging_folder(target: Path) -> Iterator[tuple[Path, Path]]:
    """Yield (staging, scratch) folders next to `target`; move staging into place on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    prefix = f".{target.name}.{_STAGING}-"
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; services may run as another user
    scratch = Path(tempfile.mkdtemp(prefix=prefix, suffix="-scratch", dir=target.parent))
    try:
        yield staging, scratch
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _swap_in(staging: Path, target: Path) -> None:
    if target.exists():
        retired = target.with_name(f".{target.name}.{_RETIRED}-{os.getpid()}")
        os.rename(target, retired)
        os.rename(staging, target)
        shutil.rmtree(retired)
    else:
        os.rename(staging, target)


def _remove_leftovers(target: Path) -> None:
    """Delete staging and retired folders of `target` left by a build that was killed."""
    for kind in (_STAGING, _RETIRED):
        for leftover in target.parent.glob(f".{target.name}.{kind}-*"):
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def exclusive_builds(root: Path, log: Log) -> Iterator[None]:
    """Serialize builds (and model additions and removals) of one home's models folder `root`,
    so two never write the same folders (leftovers are ours)."""
    lock_path = root / _LOCK_NAME
    with lock_path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another `llmos models build` on {lock_path.parent}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
