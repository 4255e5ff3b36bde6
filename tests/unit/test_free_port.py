"""Ports handed to services come from below the system's ephemeral range, where no outgoing
connection takes its local port, and are never handed out twice."""

from __future__ import annotations

import socket

import pytest

from llmos import stack

pytestmark = pytest.mark.unit


def test_ports_are_below_the_ephemeral_range_and_distinct() -> None:
    ports = [stack.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(stack.LISTEN_PORTS_FROM <= port < stack._ephemeral_ports_start() for port in ports)
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        candidates = iter([taken, taken, stack.LISTEN_PORTS_FROM + 4321])
        monkeypatch.setattr(stack.random, "randrange", lambda start, stop: next(candidates))
        monkeypatch.setattr(stack, "_ephemeral_ports_start", lambda: 65_000)
        monkeypatch.setattr(stack, "_handed_out", set())
        assert stack.free_port() == stack.LISTEN_PORTS_FROM + 4321
