"""Time bounds that hold on any machine: work is measured against a baseline run in the same test.

Both are timed in CPU time of this process, so other jobs on a shared machine do not count, and
work that overruns its limit is interrupted (SIGPROF, which pytest-timeout's SIGALRM leaves free)
instead of hanging the suite: a quadratic regression fails in seconds, not after an hour.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from types import FrameType


class Overran(AssertionError):
    """The work was still running when its CPU-time limit ran out."""


def cpu_seconds(work: Callable[[], object], repeat: int = 3) -> float:
    """The least CPU time `work` takes over `repeat` runs (a baseline: the least is the least noisy)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best


def cpu_seconds_within(work: Callable[[], object], limit_s: float) -> float:
    """The CPU time one run of `work` takes; raises Overran once it has used `limit_s`."""

    def overrun(signum: int, frame: FrameType | None) -> None:
        raise Overran(f"still running after {limit_s:.2f} s of CPU time")

    previous = signal.signal(signal.SIGPROF, overrun)
    signal.setitimer(signal.ITIMER_PROF, limit_s)
    try:
        started = time.process_time()
        work()
        return time.process_time() - started
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
