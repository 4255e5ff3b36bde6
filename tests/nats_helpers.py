"""A real nats-server with the authorization `llmos up` generates: one user per service."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from llmos.natsauth import authorization_block, new_credentials
from llmos.stack import nats_command, port_open
from tests.conftest import free_port


@dataclass(frozen=True)
class SecuredNats:
    url: str
    credentials: dict[str, str]  # user -> password


@asynccontextmanager
async def secured_nats_server(folder: Path, publishers: Mapping[str, str] | None = None) -> AsyncIterator[SecuredNats]:
    """The server, its JetStream store in `folder`; `publishers` (user -> password) are tenant publishers."""
    credentials = new_credentials()
    port = free_port()
    process = subprocess.Popen(
        nats_command(folder / "js", "127.0.0.1", port, free_port(), authorization_block(credentials, publishers)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if port_open("127.0.0.1", port):
                break
            await asyncio.sleep(0.05)
        yield SecuredNats(f"nats://127.0.0.1:{port}", credentials)
    finally:
        process.terminate()
        process.wait(timeout=10)
