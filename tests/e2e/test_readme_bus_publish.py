"""README's "Publishing a document on the bus", run as printed against `llmos up` (issue 13,
item 14): its shell line issues the tenant's publisher credentials, its Python snippet publishes
with them, and the document is indexed for that tenant. The code comes from README.md itself, so
the documentation cannot drift from what works."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from llmos.bus.follow import follow
from llmos.bus.subjects import DOCS_INDEXED
from llmos.natsauth import ADMIN_USER, credentials_path
from llmos.v1 import events_pb2
from tests.conftest import REPO, NatsServer, free_port, platform_environment
from tests.e2e.test_stack_cli import llmos

pytestmark = pytest.mark.e2e

SECTION = "### Publishing a document on the bus"


def readme_blocks(language: str) -> list[str]:
    """The fenced `language` blocks of the README's bus-publishing section, in order."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ")]
    return re.findall(rf"^```{language}\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)


async def indexed(url: str, password: str, tenant: str, document_id: str, timeout_s: float) -> events_pb2.DocumentIndexed:
    connection = await nats.connect(url, user=ADMIN_USER, password=password)
    try:
        async with asyncio.timeout(timeout_s):
            async for message in follow(connection.jetstream(), DOCS_INDEXED, 0):
                event = events_pb2.DocumentIndexed.FromString(message.data)
                if (event.tenant, event.document_id) == (tenant, document_id):
                    return event
    finally:
        await connection.close()
    raise AssertionError("unreachable: follow waits without end")


def shell_output(shell: str, env: dict[str, str]) -> str:
    """What the README's shell line exports, printed back."""
    run = subprocess.run(
        ["bash", "-c", f"set -e\n{shell}\necho NATS_USER=$NATS_USER NATS_PASSWORD=$NATS_PASSWORD"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def exported(output: str) -> dict[str, str]:
    return dict(re.findall(r"(NATS_USER|NATS_PASSWORD)=(\S+)", output.splitlines()[-1]))


async def admitted(url: str, login: dict[str, str], expected: bool) -> bool:
    """Whether nats-server comes to answer this login as `expected` (let in or refused) within
    a few seconds, the time a configuration reload may take."""
    for _ in range(50):
        try:
            connection = await nats.connect(
                url, user=login["NATS_USER"], password=login["NATS_PASSWORD"], allow_reconnect=False,
                max_reconnect_attempts=0, connect_timeout=1,
            )
        except Exception:  # noqa: BLE001 - refused
            if not expected:
                return True
        else:
            await connection.close()
            if expected:
                return True
        await asyncio.sleep(0.1)
    return False


def test_the_readme_publishes_a_document_on_the_bus_as_printed(models_home: Path, tmp_path: Path) -> None:
    [shell] = readme_blocks("bash")
    [snippet] = readme_blocks("python")
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_home / "models", target_is_directory=True)
    env = platform_environment(NatsServer(f"nats://127.0.0.1:{free_port()}", free_port(), tmp_path), home)
    env["LLMOS_NATS_MONITOR_PORT"] = str(free_port())
    up = llmos(env, tmp_path, "up", "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        (tmp_path / "publish.py").write_text(snippet)
        # The README's commands, from the repository root as printed, then its snippet.
        published = subprocess.run(
            ["bash", "-c", f"set -e\n{shell}\n{sys.executable} {tmp_path / 'publish.py'}"],
            cwd=REPO, env={**env, "NATS_URL": env["LLMOS_NATS_URL"]}, capture_output=True, text=True, timeout=60,
        )
        assert published.returncode == 0, published.stdout + published.stderr
        admin_password = json.loads(credentials_path(home).read_text())[ADMIN_USER]
        event = asyncio.run(indexed(env["LLMOS_NATS_URL"], admin_password, "demo", "faq-2", timeout_s=60))
        assert event.chunk_count == 1

        # Issuing again rotates the password; --revoke removes the user from the running server.
        url = env["LLMOS_NATS_URL"]
        old = exported(shell_output(shell, env))
        rotated = exported(shell_output(shell, env))
        assert rotated["NATS_PASSWORD"] != old["NATS_PASSWORD"]
        assert asyncio.run(admitted(url, rotated, expected=True))
        assert asyncio.run(admitted(url, old, expected=False))
        revoke = llmos(env, REPO, "keys", "publisher", "demo", "--revoke", timeout=30)
        assert revoke.returncode == 0, revoke.stdout + revoke.stderr
        assert asyncio.run(admitted(url, rotated, expected=False))
    finally:
        down = llmos(env, tmp_path, "down", timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
