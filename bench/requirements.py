"""The `bench` extra's packages but llama-cpp-python, one per line (`make bench-inference` installs them).

llama-cpp-python is left to `bench.generate`, which builds it from source for this CPU
(bench.generate.reference): pip's own build of the extra would compile it a first time for nothing.
"""

from __future__ import annotations

import tomllib

from bench.common import REPO

BUILT_BY_THE_BENCH = "llama-cpp-python"


def requirements() -> list[str]:
    with (REPO / "pyproject.toml").open("rb") as file:
        extra = tomllib.load(file)["project"]["optional-dependencies"]["bench"]
    return [requirement for requirement in extra if not requirement.startswith(BUILT_BY_THE_BENCH)]


if __name__ == "__main__":
    print("\n".join(requirements()))
