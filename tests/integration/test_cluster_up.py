"""`llmos up --cluster` through the public command line (issue 16, item 2): three clustered
nats-servers and the replicas of llmos.cluster start under a private LLMOS_HOME, `llmos status`
shows each replica SERVING and the streams at three replicas, `llmos down` leaves no process.

Run alone with `pytest -m cluster` (the start takes 1-3 minutes on two cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos.cluster import JETSTREAM_REPLICAS, NODES, REPLICAS
from llmos.natsauth import credentials_path
from llmos.settings import SERVICE_NAMES
from tests.conftest import NatsServer, free_port, platform_environment
from tests.e2e.test_stack_cli import llmos

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

UP_TIMEOUT_S = 480


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie waiting for its parent has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_up_cluster_status_down(models_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_home / "models", target_is_directory=True)
    env = platform_environment(NatsServer(f"nats://127.0.0.1:{free_port()}", free_port(), tmp_path), home)
    env["LLMOS_NATS_MONITOR_PORT"] = str(free_port())

    pids: list[int] = []
    try:
        up = llmos(env, tmp_path, "up", "--cluster", "--detach", timeout=UP_TIMEOUT_S)
        recorded = json.loads((home / "run" / "stack.json").read_text())
        pids = [process["pid"] for process in recorded]
        assert up.returncode == 0, up.stdout + up.stderr
        assert "all replicas SERVING" in up.stdout
        # Every node, every replica and the gateway, recorded for `llmos down`.
        assert len(recorded) == NODES + sum(REPLICAS.values()) + 1
        assert all(running(pid) for pid in pids)

        status = llmos(env, tmp_path, "status", "--json", timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        document = json.loads(status.stdout)
        services = {service["name"]: service for service in document["services"]}
        inference = services["inference"]["replicas"]
        # The configured address is the first replica; the second is the cluster's own.
        assert [replica["health"] for replica in inference] == ["SERVING", "SERVING"]
        assert inference[0]["address"] == env["LLMOS_INFERENCE_ADDR"] and inference[1]["address"] != inference[0]["address"]
        assert {name: len(service["replicas"]) for name, service in services.items()} == {name: REPLICAS[name] for name in SERVICE_NAMES}
        assert document["healthy"] and len(document["nats"]["nodes"]) == NODES
        assert {stream["replicas"] for stream in document["streams"]} == {JETSTREAM_REPLICAS}

        table = llmos(env, tmp_path, "status", timeout=60)
        assert table.returncode == 0 and table.stdout.count("SERVING") == sum(REPLICAS.values()), table.stdout
    finally:
        down = llmos(env, tmp_path, "down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [pid for pid in pids if running(pid)]
    assert not (home / "run" / "stack.json").exists()
    assert not credentials_path(home).exists()
