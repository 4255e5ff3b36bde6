"""The generated code in libs/llmos/v1 must be what `make protos` produces from protos/."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    protos = sorted((REPO / "protos/llmos/v1").glob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'protos'}",
         f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
         f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
         f"--mypy_out={tmp_path}", f"--mypy_grpc_out={tmp_path}", *map(str, protos)],
        check=True,
        capture_output=True,
    )
    generated = tmp_path / "llmos/v1"
    committed = REPO / "libs/llmos/v1"
    names = sorted(path.name for path in generated.iterdir())
    assert names, "protoc generated nothing"
    missing = [name for name in names if not (committed / name).exists()]
    stale = [name for name in names if (committed / name).exists() and not filecmp.cmp(generated / name, committed / name, shallow=False)]
    assert not missing and not stale, f"run `make protos`: missing {missing}, stale {stale}"
    extra = sorted(
        path.name for path in committed.iterdir()
        if path.suffix in (".py", ".pyi") and path.name != "__init__.py" and path.name not in names
    )
    assert not extra, f"generated files without a proto: {extra}"
    shutil.rmtree(tmp_path / "llmos")
