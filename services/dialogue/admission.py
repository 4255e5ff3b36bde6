"""Turn-level admission: a chat turn that cannot be answered in time is refused at once.

The dialogue knows its turns in flight and measures their pace: the busy seconds (some turn in
flight) per turn answered, over the last `horizon_s` seconds (the busy time of a turn that
failed or went away counts towards the next one answered: at a deadline too short for the
work, failed turns leaving early would otherwise look like fast ones), counting only turns that
had company (under load, that is the time the service needs per turn: 16 turns that
came together and left 2 s later took 1/8 s each; a lone turn's time is mostly waiting on other
services, which turns together overlap, and would overstate it many times). Turns in flight
share the process and the services behind it, so a new turn is expected to finish after about
(turns in flight + 1) × that pace, having waited the part the others take. A turn expected to
wait longer than the longest wait allowed, or to finish after its caller's deadline, is refused
with RESOURCE_EXHAUSTED and a retry hint (`errors.ResourceExhausted`, mapped to gRPC's
`grpc-retry-pushback-ms` once, in `llmos.grpcutil.status`), before it costs anything: queueing it
would only make every turn in flight later. Nothing is refused before a pace has been measured,
nor when no turn is in flight (nothing would make it faster).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from llmos.deadline import Deadline
from llmos.errors import ResourceExhausted

# Recent enough to forget a cold start (a process's first questions about an article embed its
# sentences, several times slower than later ones) within seconds, long enough to span many turns.
PACE_HORIZON_S = 10.0


@dataclass
class _Turn:
    shared: bool = False  # another turn was in flight at some time during this one


class TurnAdmission:
    def __init__(
        self, max_wait_s: float | None, horizon_s: float = PACE_HORIZON_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """`max_wait_s`: the longest expected wait behind the turns in flight (None: only deadlines
        refuse); `clock`: the monotonic clock deadlines are on."""
        self._max_wait_s = max_wait_s
        self._horizon_s = horizon_s
        self._clock = clock
        self._busy_from = 0.0  # the busy time to the next departure counts from here
        self._flying: list[_Turn] = []
        self._busy_s = 0.0  # busy seconds and departures, each decayed by its age (horizon_s)
        self._departures = 0.0
        self._updated = 0.0

    @property
    def in_flight(self) -> int:
        return len(self._flying)

    @property
    def seconds_per_turn(self) -> float | None:
        """Busy seconds per turn answered in company, lately; None until one has been."""
        return self._busy_s / self._departures if self._departures else None

    def expected_s(self) -> tuple[float, float] | None:
        """(wait behind the turns in flight, time to finish) of a turn starting now; None: not known."""
        pace = self.seconds_per_turn
        if pace is None:
            return None
        return self.in_flight * pace, (self.in_flight + 1) * pace

    def check(self, deadline: Deadline | None) -> None:
        """Refuse (ResourceExhausted) a turn expected to wait too long or to finish past `deadline`."""
        expected = self.expected_s()
        if expected is None or not self.in_flight:
            return
        wait, done = expected
        pace = self.seconds_per_turn or 0.0
        if self._max_wait_s is not None and wait > self._max_wait_s:
            raise ResourceExhausted(
                f"the dialogue service is at capacity: {self.in_flight} turns in flight, a new turn would wait about "
                f"{wait:.1f} s, longer than the longest wait allowed ({self._max_wait_s:.1f} s)",
                # By then the turns that make it wait too long have been answered.
                retry_after_s=max(wait - self._max_wait_s, pace),
            )
        left = deadline.at - self._clock() if deadline is not None else None
        if left is not None and done > left:
            raise ResourceExhausted(
                f"the dialogue service is at capacity: {self.in_flight} turns in flight, a new turn would finish in about "
                f"{done:.1f} s, after its deadline ({max(left, 0.0):.1f} s)",
                retry_after_s=max(done - max(left, 0.0), pace),
            )

    @contextmanager
    def turn(self, deadline: Deadline | None, refusable: bool = True) -> Iterator[None]:
        """One turn in flight (refused first when `refusable` and it cannot be answered in time)."""
        if refusable:
            self.check(deadline)
        now = self._clock()
        if not self.in_flight:
            self._busy_from = now
        turn = _Turn()
        self._flying.append(turn)
        if len(self._flying) > 1:
            for other in self._flying:
                other.shared = True
        try:
            yield
        except BaseException:
            self._flying.remove(turn)
            raise
        self._answered(turn)

    def _answered(self, turn: _Turn) -> None:
        now = self._clock()
        self._flying.remove(turn)
        if turn.shared:
            decay = math.exp(-(now - self._updated) / self._horizon_s)
            self._busy_s = self._busy_s * decay + (now - self._busy_from)
            self._departures = self._departures * decay + 1.0
            self._updated = now
            self._busy_from = now
