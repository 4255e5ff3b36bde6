"""The foreground loop of `llmos up` and `llmos up --cluster`: it ends with the watcher's exit
code (a service exited) or with 0 on SIGTERM / Ctrl-C, and the caller then stops the stack."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from llmos_cli.main import _until_stopped

pytestmark = pytest.mark.unit


def test_the_watchers_exit_code_ends_the_loop() -> None:
    calls: list[int] = []

    def watch() -> int | None:
        calls.append(1)
        return 1 if len(calls) == 3 else None

    assert _until_stopped(watch) == 1 and len(calls) == 3


def test_sigterm_ends_the_loop_with_0() -> None:
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert _until_stopped(lambda: None) == 0
    finally:
        timer.cancel()
        for number, handler in previous.items():
            signal.signal(number, handler)
