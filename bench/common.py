"""What the benchmarks share: free ports and the environment of a private embedded stack."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from llmos.assertions import service_key_environment
from llmos.settings import SERVICE_NAMES, PlatformSettings

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_from(env: dict[str, str]) -> PlatformSettings:
    """The settings a service started with exactly `env` reads (this process's environment left as it was)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return PlatformSettings(_env_file=None)  # type: ignore[call-arg]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def private_environment(home: Path, api_key: str, **variables: str) -> None:
    """A stack of its own under `home` (sharing the built models) on free ports, with `api_key` an admin
    key of tenant `bench`, so a running `llmos up` is no obstacle; `variables` are the bench's own settings."""
    (home / "models").symlink_to((REPO / ".llmos" / "models").resolve(), target_is_directory=True)
    os.environ.update({
        "LLMOS_HOME": str(home),
        "LLMOS_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "LLMOS_NATS_MONITOR_PORT": str(free_port()),
        "LLMOS_API_KEYS": f"{api_key}=bench:bench:admin",
        "LLMOS_GATEWAY_ADDR": f"127.0.0.1:{free_port()}",
        # The bench sends the same prompts more than once: without this, a later run reuses an earlier
        # one's KV cache and its first token comes early, which says nothing about what is measured.
        "LLMOS_INFERENCE_PREFIX_CACHE_MIN_TOKENS": "1000000",
        **service_key_environment(),
        **variables,
    })
    for name in SERVICE_NAMES:
        os.environ[f"LLMOS_{name.upper()}_ADDR"] = f"127.0.0.1:{free_port()}"
