"""Fixtures shared by the test tiers: a real nats-server, built models, and a running stack."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmos.assertions import service_key_environment
from llmos.crypto import new_key_entry
from llmos.settings import SERVICE_NAMES, PlatformSettings
from llmos.stack import free_port, nats_command, port_open, stop_pids, wait_until_serving

REPO = Path(__file__).resolve().parents[1]
TEST_API_KEY = "test-admin-key"
# Static keys of the services under test: key -> subject:tenant:roles.
TEST_KEYS = {
    TEST_API_KEY: "tester:acme:admin",
    "user-key-acme": "alice:acme:user",
    "operator-key-acme": "olga:acme:operator",
    "user-key-globex": "bob:globex:user",
}


@dataclass(frozen=True)
class NatsServer:
    url: str
    monitor_port: int
    store: Path


@contextmanager
def running_nats_server(store: Path) -> Iterator[NatsServer]:
    """A real `nats-server -js` on free ports, its JetStream data in `store`, stopped on leaving."""
    port, monitor_port = free_port(), free_port()
    process = subprocess.Popen(
        nats_command(store, "127.0.0.1", port, monitor_port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if port_open("127.0.0.1", port):
                break
            if process.poll() is not None:
                raise RuntimeError("nats-server exited at start")
            time.sleep(0.05)
        yield NatsServer(f"nats://127.0.0.1:{port}", monitor_port, store)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """The session's nats-server, in a temp folder."""
    with running_nats_server(tmp_path_factory.mktemp("nats") / "jetstream") as server:
        yield server


@pytest.fixture(scope="session")
def models_home() -> Path:
    """The folder holding built models (`llmos models build`), built here when missing."""
    from llmos.models import build_models, models_built

    home = Path(os.environ.get("LLMOS_TEST_MODELS_HOME", REPO / ".llmos")).resolve()
    if not models_built(home):
        build_models(home)
    return home


def platform_environment(nats: NatsServer, home: Path) -> dict[str, str]:
    """Environment for services under test: free ports, this NATS, a private home."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMOS_")}
    env.update(
        {
            "LLMOS_HOME": str(home),
            "LLMOS_NATS_URL": nats.url,
            "LLMOS_BIND_HOST": "127.0.0.1",
            "LLMOS_API_KEYS": ",".join(f"{key}={identity}" for key, identity in TEST_KEYS.items()),
            # Each service its own signing key (llmos.assertions), fresh for every test stack.
            **service_key_environment(),
            "LLMOS_ENCRYPTION_KEYS": new_key_entry("test"),
            "LLMOS_LOG_LEVEL": "INFO",
            # Test stacks are development stacks (llmos.secrets): the keys above are in the repository.
            "LLMOS_DEV": "true",
            # Seven services and the tests share the machine's cores: spinning threads would starve the rest.
            "LLMOS_INFERENCE_THREAD_SPINNING": "false",
        }
    )
    for name in SERVICE_NAMES:
        env[f"LLMOS_{name.upper()}_ADDR"] = f"127.0.0.1:{free_port()}"
        # Prometheus text of each service (tests/integration/test_metrics.py scrapes it).
        env[f"LLMOS_{name.upper()}_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
    # The HTTP gateway `llmos up` starts with the services: a port of its own too.
    env["LLMOS_GATEWAY_ADDR"] = f"127.0.0.1:{free_port()}"
    return env


@dataclass
class RunningStack:
    env: dict[str, str]
    settings: PlatformSettings
    home: Path

    def addr(self, service: str) -> str:
        return self.settings.service_addr(service)


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ is exactly `env` inside (settings read only what the test gives them), restored after."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _settings_from(env: dict[str, str]) -> PlatformSettings:
    with environment(env):
        return PlatformSettings(_env_file=None)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def stack(nats_server: NatsServer, models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """All seven services as real processes against the session's nats-server."""
    home = tmp_path_factory.mktemp("llmos-home")
    (home / "models").symlink_to(models_home / "models", target_is_directory=True)
    env = platform_environment(nats_server, home)
    settings = _settings_from(env)
    logs = home / "logs"
    logs.mkdir()
    processes = {}
    for name in SERVICE_NAMES:
        with (logs / f"{name}.log").open("wb") as log:
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"], cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT
            )
    try:
        wait_until_serving(settings, processes, timeout_s=120)
        yield RunningStack(env, settings, home)
    finally:
        stop_pids([process.pid for process in processes.values()], timeout_s=15)
