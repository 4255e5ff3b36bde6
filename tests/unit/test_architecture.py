"""The layering the platform keeps, checked on the source (parsed, never imported):
services -> libs/llmos -> generated protos; servicers and handlers -> one core per service.

It fails on
- `libs/` importing `services`: the shared library knows no service;
- `libs/llmos` or a service importing `llmos_cli`: the `llmos` command uses the library and
  calls the services, never the reverse;
- a service importing another service's package: services meet over gRPC and the bus only;
- a `services/<name>/core.py` importing grpc, faststream or nats: a core is handed ports
  (`llmos.ports`) by its composition root (`app.py`), so both transports drive the same logic;
- an import cycle inside `libs/llmos`, counting the imports that run when a module loads and
  those under `if TYPE_CHECKING:` (a type-only import is a dependency too), not the deferred
  ones inside functions.
"""

from __future__ import annotations

import ast
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
TRANSPORTS = frozenset({"grpc", "faststream", "nats"})


@dataclass(frozen=True)
class Import:
    module: str  # dotted, made absolute
    names: tuple[str, ...]  # of `from module import names`: each may be a submodule
    line: int
    at_load: bool  # outside any function: runs when the importing module loads

    def needs(self, modules: Container[str]) -> set[str]:
        """Which of `modules` this import needs loaded: each imported submodule, and the module
        itself unless every name is a submodule (a package's `__init__` then need not finish)."""
        submodules = {f"{self.module}.{name}" for name in self.names} & set(modules)
        whole = not self.names or len(submodules) < len(self.names)
        return submodules | ({self.module} if whole and self.module in modules else set())


@dataclass(frozen=True)
class Module:
    name: str
    path: str
    imports: tuple[Import, ...]


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*parts, node.module] if node.module else parts)


def _imports(node: ast.AST, package: str, at_load: bool) -> Iterator[Import]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            yield from (Import(alias.name, (), child.lineno, at_load) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            names = tuple(alias.name for alias in child.names)
            yield Import(_absolute(child, package), names, child.lineno, at_load)
        else:
            deferred = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from _imports(child, package, at_load and not deferred)


def parse_module(path: str, source: str) -> Module:
    """`path` relative to the repository: libs/llmos/... or services/..."""
    parts = list(Path(path).with_suffix("").parts)
    if parts[0] == "libs":
        parts = parts[1:]
    is_package = parts[-1] == "__init__"
    name = ".".join(parts[:-1] if is_package else parts)
    package = name if is_package else name.rpartition(".")[0]
    return Module(name, path, tuple(_imports(ast.parse(source, path), package, True)))


def repository_modules() -> list[Module]:
    paths = [*sorted((REPO / "libs").rglob("*.py")), *sorted((REPO / "services").rglob("*.py"))]
    return [parse_module(path.relative_to(REPO).as_posix(), path.read_text(encoding="utf-8")) for path in paths]


def _top(module: str) -> str:
    return module.partition(".")[0]


def _service(module: str) -> str:
    """`services.<name>` of a module in a service, else ""."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "services" and len(parts) > 1 else ""


def _import_violations(modules: Iterable[Module]) -> Iterator[str]:
    for module in modules:
        own_service = _service(module.name)
        is_core = bool(own_service) and module.name == f"{own_service}.core"
        for imported in module.imports:
            where = f"{module.path}:{imported.line}"
            if not own_service and _top(imported.module) == "services":
                yield f"{where}: libs/ imports {imported.module} (the shared library must not know a service)"
            if _top(module.name) == "llmos" and _top(imported.module) == "llmos_cli":
                yield f"{where}: libs/llmos imports {imported.module} (the library must not know the CLI)"
            if own_service and _top(imported.module) == "llmos_cli":
                yield f"{where}: {own_service} imports {imported.module} (a service must not know the CLI)"
            if own_service and _service(imported.module) not in ("", own_service):
                yield f"{where}: {own_service} imports {imported.module} (another service's package)"
            if is_core and _top(imported.module) in TRANSPORTS:
                yield f"{where}: a core imports {imported.module} (a transport; take a port from llmos.ports)"


def _cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_violations(modules: Iterable[Module]) -> Iterator[str]:
    library = {module.name: module for module in modules if _top(module.name) == "llmos"}
    graph = {
        name: {
            needed for imported in module.imports if imported.at_load for needed in imported.needs(library)
        } - {name}
        for name, module in library.items()
    }
    for component in _cycles(graph):
        yield "import cycle in libs/llmos: " + ", ".join(component)


def violations(modules: Iterable[Module]) -> list[str]:
    modules = list(modules)
    return [*_import_violations(modules), *_cycle_violations(modules)]


def test_libs_and_services_keep_the_layering() -> None:
    assert violations(repository_modules()) == []


def test_the_check_fails_on_each_kind_of_violation() -> None:
    sources = {
        "libs/llmos/__init__.py": "",
        "libs/llmos/cli/speech.py": "def normalize():\n    from services.speech.domain import spoken_words\n",
        "libs/llmos/audit.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from llmos.bus.broker import Bus\n",
        "libs/llmos/bus/__init__.py": "",
        "libs/llmos/bus/broker.py": "from faststream.nats import NatsBroker\nfrom llmos.audit import audit_event\n",
        "libs/llmos/models/__init__.py": "from .store import artefact_dir\nfrom .build import build_models\n",
        "libs/llmos/models/store.py": "from llmos.models import artefact_root\n",  # needs the package's __init__
        "libs/llmos/models/build.py": "from llmos.models import catalog\n",  # needs only the submodule
        "libs/llmos/models/catalog.py": "",
        "libs/llmos/lazy.py": "def later():\n    import llmos.eager\n",
        "libs/llmos/eager.py": "import llmos.lazy\n",
        "services/__init__.py": "",
        "services/ingest/core.py": "import grpc\nfrom nats.js.errors import KeyNotFoundError\nfrom services.ingest.chunking import chunk_spans\n",
        "services/ingest/app.py": "import grpc\nfrom services.retrieval.index import Hit\n",
        "services/retrieval/core.py": "from llmos.bus.broker import Bus\n",
    }
    assert violations(parse_module(path, source) for path, source in sources.items()) == [
        "libs/llmos/cli/speech.py:2: libs/ imports services.speech.domain (the shared library must not know a service)",
        "services/ingest/core.py:1: a core imports grpc (a transport; take a port from llmos.ports)",
        "services/ingest/core.py:2: a core imports nats.js.errors (a transport; take a port from llmos.ports)",
        "services/ingest/app.py:2: services.ingest imports services.retrieval.index (another service's package)",
        "import cycle in libs/llmos: llmos.audit, llmos.bus.broker",
        "import cycle in libs/llmos: llmos.models, llmos.models.store",
    ]


def test_the_library_and_the_services_must_not_import_the_cli() -> None:
    sources = {
        "libs/llmos/stack.py": "from llmos_cli.status import print_status\n",
        "libs/llmos/audit.py": "def later():\n    import llmos_cli.main\n",
        "libs/llmos_cli/main.py": "from llmos.stack import Stack\nfrom llmos_cli.status import print_status\n",
        "services/gateway/console.py": "from llmos_cli.tracetree import tree_rows\n",
    }
    assert violations(parse_module(path, source) for path, source in sources.items()) == [
        "libs/llmos/stack.py:1: libs/llmos imports llmos_cli.status (the library must not know the CLI)",
        "libs/llmos/audit.py:2: libs/llmos imports llmos_cli.main (the library must not know the CLI)",
        "services/gateway/console.py:1: services.gateway imports llmos_cli.tracetree (a service must not know the CLI)",
    ]
