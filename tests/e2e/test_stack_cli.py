"""The embedded stack through its public command line: up, status, a call, trace, down."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from llmos.clients import IngestClient
from llmos.settings import SERVICE_NAMES
from llmos.v1 import ingest_pb2
from tests.conftest import NatsServer, free_port, platform_environment
from tests.grpc_helpers import ADMIN

pytestmark = pytest.mark.e2e


def llmos(env: dict[str, str], cwd: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmos_cli.main", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_up_status_trace_down(models_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_home / "models", target_is_directory=True)
    nats_port = free_port()
    env = platform_environment(NatsServer(f"nats://127.0.0.1:{nats_port}", free_port(), tmp_path), home)
    env["LLMOS_NATS_MONITOR_PORT"] = str(free_port())

    started = time.monotonic()
    up = llmos(env, tmp_path, "up", "--detach")
    startup_s = time.monotonic() - started
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "all services SERVING" in up.stdout
        # The gateway runs with them and answers where `llmos up` says.
        assert f"web: http://{env['LLMOS_GATEWAY_ADDR']}" in up.stdout
        assert urllib.request.urlopen(f"http://{env['LLMOS_GATEWAY_ADDR']}/healthz", timeout=5).status == 200
        print(f"stack startup: {startup_s:.1f} s")

        status = llmos(env, tmp_path, "status", timeout=30)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("SERVING") == 7
        assert "INGEST" in status.stdout and "audit-llmos-audit-all" in status.stdout
        status_json = json.loads(llmos(env, tmp_path, "status", "--json", timeout=30).stdout)
        assert status_json["healthy"] and {s["name"]: s["health"] for s in status_json["services"]} == dict.fromkeys(SERVICE_NAMES, "SERVING")
        assert "INGEST" in {stream["name"] for stream in status_json["streams"]}
        created = llmos(env, tmp_path, "keys", "create", "--subject", "e2e", "--tenant", "acme", "--role", "user", timeout=30)
        assert created.returncode == 0, created.stdout + created.stderr
        keys = json.loads(llmos(env, tmp_path, "keys", "list", "--json", timeout=30).stdout)["keys"]
        assert {"subject": "e2e", "tenant": "acme", "roles": ["user"]}.items() <= keys[0].items() and keys[0]["key_id"]
        streams = llmos(env, tmp_path, "streams", timeout=30)
        assert streams.returncode == 0 and "match this version" in streams.stdout, streams.stdout + streams.stderr

        async def submit() -> None:
            async with grpc.aio.insecure_channel(env["LLMOS_INGEST_ADDR"]) as channel:
                await IngestClient(channel, ADMIN).submit(ingest_pb2.SubmitDocumentRequest(document_id="e2e", content=b"End to end."))

        asyncio.run(submit())
        for _ in range(50):
            trace = llmos(env, tmp_path, "trace", "--last", timeout=30)
            if "tokenizer" in trace.stdout and "audit" in trace.stdout:
                break
            time.sleep(0.2)
        assert trace.returncode == 0, trace.stderr
        assert "IngestService/SubmitDocument" in trace.stdout and "TokenizerService/Tokenize" in trace.stdout

        for _ in range(50):
            audit = llmos(env, tmp_path, "audit", "query", "--action", "llmos.v1.IngestService/SubmitDocument", timeout=30)
            if "document/e2e" in audit.stdout:
                break
            time.sleep(0.2)
        assert audit.returncode == 0 and "tester" in audit.stdout and "allow" in audit.stdout, audit.stdout + audit.stderr
        records = json.loads(llmos(env, tmp_path, "audit", "query", "--action", "llmos.v1.IngestService/SubmitDocument", "--json", timeout=30).stdout)["records"]
        assert any(r["resource"] == "document/e2e" and r["principal"] == "tester" and r["decision"] == "allow" for r in records), records
        verify = llmos(env, tmp_path, "audit", "verify", timeout=30)
        assert verify.returncode == 0 and verify.stdout.startswith("intact"), verify.stdout + verify.stderr
    finally:
        down = llmos(env, tmp_path, "down", timeout=60)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not (home / "run" / "stack.json").exists()
    again = llmos(env, tmp_path, "status", timeout=30)
    assert again.returncode == 1 and "UNREACHABLE" in again.stdout
    for log in ("nats", "ingest", "tokenizer", "audit"):
        assert (home / "logs" / f"{log}.log").exists()
