"""Continuous batching of generation requests over the decoder's slot KV cache.

One thread owns the decoder. Each turn of its loop it drops cancelled or expired work, admits
waiting requests into free slots (each prompt prefilled alone, reusing a cached prompt prefix
when one matches), then runs one decode step for every running sequence together. A request
joins at the next step and leaves the moment it finishes or its caller goes away.

Each priority class has its own bounded queue. Admission order: interactive before standard
before batch; within a class, the tenant with the fewest running sequences first (fair share),
then the oldest request. While sequences are decoding, non-interactive prompts share a budget of
PREFILL_CHUNK_TOKENS prompt tokens a turn (a prompt not finished rides along in the decode steps,
its logits unused, and its next piece overwrites what those steps wrote), so an interactive
request that arrives waits for at most one budget and one step, and running streams keep stepping. `reserved_interactive` slots are never given to batch work; when
an interactive request finds every slot taken, a running batch sequence is pre-empted: its KV
cache is parked in host memory and it waits again, to resume where it stopped (no prefill) when
a slot frees. A bulk job therefore never makes a chat wait for a generation to end.

Admission knows the expected wait (`WaitEstimator`): from the work ahead of a new request (the
running sequences' expected remaining tokens, the waiting requests of its class and above) and
the measured decode-step time and prefill rate, it estimates when a slot frees and its prompt
can start. A request expected to wait longer than its class's longest wait, or to finish after
its remaining deadline, is refused at once with RESOURCE_EXHAUSTED and a retry hint, instead of
queueing past the point where its answer is of use to anybody.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from opentelemetry import metrics

from llmos.deadline import Deadline
from llmos.errors import DeadlineExceeded, LlmosError, ResourceExhausted, Unavailable
from llmos.tokenization import ModelTokenizer, TextStream
from services.inference.batching import PRIORITY_NAMES, priority_rank
from services.inference.decoder import CachedPrefix, Decoder

logger = logging.getLogger(__name__)

# Prompts are prefilled in pieces of this many tokens: bounds the logits tensor of a long prompt.
PREFILL_CHUNK_TOKENS = 256
# A prefill piece is never a single token: the int4 MatMulNBits kernels take another path for one
# row (the decode path) whose rounding differs, and a cached prefix must give exactly the logits
# of an uncached prompt.
MIN_PREFILL_PIECE = 2
INCOMPLETE_CHARACTER = "\ufffd"
INTERACTIVE_RANK = 0
BATCH_RANK = 2
# Where a turn of the scheduler thread goes: admitting and prefilling prompts, the decode step's
# model run, sampling the step's tokens, and detokenizing and handing them to their streams.
PHASES = ("admit", "decode", "sample", "deliver")


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    sampling: SamplingConfig
    tenant: str
    priority: int
    deadline: Deadline | None = None  # None: no deadline


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int
    queue_ms: float
    time_to_first_token_ms: float
    tokens_per_second: float
    # Mean time of each sampled token after the first (0 with fewer than two).
    time_per_output_token_ms: float = 0.0


@dataclass(frozen=True)
class StreamEvent:
    delta: str
    token_ids: tuple[int, ...]
    finish: FinishReason | None = None
    usage: Usage | None = None


def sample(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise temperature, then top-k, then top-p (nucleus)."""
    if config.temperature == 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / config.temperature
    candidates = np.arange(scaled.size)
    if 0 < config.top_k < scaled.size:
        candidates = np.argpartition(-scaled, config.top_k)[:config.top_k]
    chosen = scaled[candidates]
    probs = np.exp(chosen - chosen.max())
    probs /= probs.sum()
    if 0.0 < config.top_p < 1.0:
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), config.top_p)) + 1]
        candidates, probs = candidates[keep], probs[keep] / probs[keep].sum()
    return int(rng.choice(candidates, p=probs))


@dataclass
class StepProfile:
    """The scheduler thread's time per phase since it started: wall and thread-CPU seconds, and the
    decode steps and the rows they ran (their mean is the batch the model really got)."""

    steps: int = 0
    rows: int = 0
    wall_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


class _PhaseClock:
    """Laps of the scheduler thread: each `lap` charges the time since the last one to a phase."""

    def __init__(self) -> None:
        self.profile = StepProfile()
        self.turn_wall_s: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.turn_cpu_s: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._wall = self._cpu = 0.0

    def start_turn(self) -> None:
        for phase in PHASES:
            self.turn_wall_s[phase] = self.turn_cpu_s[phase] = 0.0
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def lap(self, phase: str) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        self.turn_wall_s[phase] += wall - self._wall
        self.turn_cpu_s[phase] += cpu - self._cpu
        self.profile.wall_s[phase] += wall - self._wall
        self.profile.cpu_s[phase] += cpu - self._cpu
        self._wall, self._cpu = wall, cpu


@dataclass(frozen=True)
class QueuedWork:
    """What the wait estimate needs to know of one request ahead of a new one."""

    prefill_tokens: int  # prompt tokens still to run (a waiting prompt: its whole length)
    generated: int  # tokens it has sampled so far
    max_new_tokens: int
    rank: int


class WaitEstimator:
    """Expected wait of a new request for its slot, from EWMAs of the measured rates.

    Decode-step time is kept per batch size (a step of 8 rows costs more than one of 1), the
    prefill rate in prompt tokens per second, the share of a prompt's tokens that must actually
    be prefilled (the rest comes from the prefix cache), and the tokens a finished request of
    each priority class generated. Until a class has finished a request, its requests are
    expected to use their whole `max_new_tokens` (a pessimistic first guess).
    """

    def __init__(self, smoothing: float = 0.2, first_step_s: float = 0.02, first_prefill_tps: float = 1000.0) -> None:
        self._smoothing = smoothing
        self._first_step_s = first_step_s
        self._step_s: dict[int, float] = {}
        self.prefill_tps = first_prefill_tps
        self.uncached_share = 1.0
        self._generated: dict[int, float] = {}

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self._smoothing) * old + self._smoothing * new

    def observe_step(self, batch: int, seconds: float) -> None:
        self._step_s[batch] = self._ewma(self._step_s.get(batch), seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill_tps = self._ewma(self.prefill_tps, tokens / seconds)

    def observe_admission(self, prompt_tokens: int, cached_tokens: int) -> None:
        if prompt_tokens > 0:
            self.uncached_share = self._ewma(self.uncached_share, (prompt_tokens - cached_tokens) / prompt_tokens)

    def observe_finish(self, rank: int, generated: int) -> None:
        self._generated[rank] = self._ewma(self._generated.get(rank), generated)

    def step_s(self, batch: int) -> float:
        """Seconds of one decode step of `batch` rows, erring long where that size is not measured:
        between two measured sizes, interpolated; above them, grown in proportion to the rows
        (a burst after a quiet spell meets full batches only step times of one row have been
        measured for); below them, the smallest measured."""
        if batch in self._step_s:
            return self._step_s[batch]
        below = max((size for size in self._step_s if size < batch), default=None)
        above = min((size for size in self._step_s if size > batch), default=None)
        if below is None and above is None:
            return self._first_step_s
        if below is None:
            return self._step_s[above]  # type: ignore[index]
        if above is None:
            return self._step_s[below] * batch / below
        share = (batch - below) / (above - below)
        return self._step_s[below] + share * (self._step_s[above] - self._step_s[below])

    def tokens_left(self, work: QueuedWork) -> float:
        """Decode steps `work` is expected to take before it frees its slot (at least one)."""
        expected = min(float(work.max_new_tokens), self._generated.get(work.rank, float(work.max_new_tokens)))
        return max(1.0, expected - work.generated)

    def expected_wait(self, running: Sequence[QueuedWork], ahead: Sequence[QueuedWork], slots: int) -> float:
        """Seconds until a new request gets a slot and its prompt can start.

        `running` hold slots it cannot take; `ahead` are served first, in order, each taking the
        slot that frees first; `slots` is how many it may use. Prompts ahead are prefilled on the
        same cores as the decode steps, so their prefill time adds to the wait.
        """
        if slots <= 0:
            raise ValueError("a request with no slot it may use waits forever")
        step = self.step_s(min(slots, len(running) + len(ahead) + 1))
        free_at = [self.tokens_left(work) * step for work in running[:slots]]
        free_at += [0.0] * (slots - len(free_at))
        heapq.heapify(free_at)
        prefill_tokens = float(sum(work.prefill_tokens for work in running))
        for work in ahead:
            heapq.heappush(free_at, heapq.heappop(free_at) + self.tokens_left(work) * step)
            prefill_tokens += work.prefill_tokens * self.uncached_share
        return free_at[0] + prefill_tokens / self.prefill_tps

    def service_s(self, work: QueuedWork, batch: int) -> float:
        """Seconds `work` is expected to take once it has its slot: its prompt, then its tokens."""
        return work.prefill_tokens * self.uncached_share / self.prefill_tps + self.tokens_left(work) * self.step_s(batch)


@dataclass(frozen=True)
class AdmissionLimits:
    """The longest expected wait for a slot each class accepts (None: only its deadline limits it)."""

    interactive_max_wait_s: float | None = None
    max_wait_s: float | None = None

    def for_rank(self, rank: int) -> float | None:
        return self.interactive_max_wait_s if rank == INTERACTIVE_RANK else self.max_wait_s


@dataclass(eq=False)
class _Sequence:
    """One request while the scheduler holds it."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[StreamEvent | LlmosError]
    arrived: float
    rng: np.random.Generator
    deadline: float | None  # time.monotonic() seconds (Deadline.at)
    text: TextStream  # the generated text, detokenized as the tokens come
    outbox: list[tuple[_Sequence, StreamEvent | LlmosError]]  # the scheduler's: events not yet handed over
    rank: int = 1
    cancelled: bool = False
    row: int = -1
    length: int = 0  # tokens in this sequence's KV cache
    prompt_done: int = -1  # prompt tokens in the cache; -1 until it has a slot
    next_token: int = 0  # sampled, not yet fed to the model
    admitted: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    cached_tokens: int = 0
    parked: CachedPrefix | None = None  # the KV cache of a pre-empted sequence, until it resumes
    generated: list[int] = field(default_factory=list)
    unsent_ids: list[int] = field(default_factory=list)
    sent_chars: int = 0

    def send(self, event: StreamEvent | LlmosError) -> None:
        """Post `event` to the outbox; the scheduler hands it over with the rest of its turn's."""
        self.outbox.append((self, event))

    def work(self) -> QueuedWork:
        prompt = len(self.request.prompt_ids)
        unread = 0 if self.parked is not None else prompt - max(self.prompt_done, 0)
        return QueuedWork(unread, len(self.generated), self.request.sampling.max_new_tokens, self.rank)

    @property
    def prefilling(self) -> bool:
        return self.prompt_done < len(self.request.prompt_ids)


def _put_all(events: list[tuple[_Sequence, StreamEvent | LlmosError]]) -> None:
    """On a stream's event loop: queue each event for its stream, in order."""
    for sequence, event in events:
        sequence.events.put_nowait(event)


class PrefixCache:
    """Recent prompts' KV caches; any prefix of one is the exact cache of that prefix.

    Entries are kept per tenant and found only by the tenant that made them: a prefix reused
    across tenants would show in the usage (cached prompt tokens) and the time to first token,
    telling one tenant what another's prompts begin with. The token budget is shared.
    """

    def __init__(self, max_tokens: int, min_tokens: int) -> None:
        self._entries: OrderedDict[int, tuple[str, CachedPrefix]] = OrderedDict()
        self._max_tokens = max_tokens
        self.min_tokens = min_tokens
        self._next_key = 0

    @property
    def tokens(self) -> int:
        return sum(len(entry.token_ids) for _, entry in self._entries.values())

    def lookup(self, tenant: str, prompt: np.ndarray) -> tuple[CachedPrefix | None, int]:
        """The tenant's entry sharing the longest prefix with `prompt`, and that prefix's length."""
        best: tuple[CachedPrefix | None, int, int] = (None, 0, -1)
        for key, (owner, entry) in self._entries.items():
            if owner != tenant:
                continue
            n = min(len(entry.token_ids), len(prompt))
            differs = np.flatnonzero(entry.token_ids[:n] != prompt[:n])
            common = int(differs[0]) if differs.size else n
            if common > best[1]:
                best = (entry, common, key)
        entry, common, key = best
        if entry is None or common < self.min_tokens:
            return None, 0
        self._entries.move_to_end(key)
        return entry, common

    def add(self, tenant: str, entry: CachedPrefix) -> None:
        if self._max_tokens <= 0 or len(entry.token_ids) > self._max_tokens:
            return
        self._entries[self._next_key] = (tenant, entry)
        self._next_key += 1
        while self.tokens > self._max_tokens:
            self._entries.popitem(last=False)


class GenerationScheduler:
    def __init__(
        self,
        decoder: Decoder,
        tokenizer: ModelTokenizer,
        queue_size: int,
        reserved_interactive: int,
        prefix_cache: PrefixCache,
        admission: AdmissionLimits | None = None,
    ) -> None:
        self._decoder = decoder
        self._tokenizer = tokenizer
        self._max_batch = decoder.max_batch
        self._queue_size = queue_size
        self._reserved_interactive = min(reserved_interactive, self._max_batch - 1)
        self._prefix_cache = prefix_cache
        self._stop_ids = frozenset(
            {*decoder.config.eos_token_ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
        )
        self._waiting: list[_Sequence] = []
        self._running: list[_Sequence] = []  # running[i].row == i
        self._outbox: list[tuple[_Sequence, StreamEvent | LlmosError]] = []
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Seconds a request holds a slot, smoothed: the basis of the retry hint when the queue is full.
        self._service_time_s = 2.0
        self._admission = admission or AdmissionLimits()
        self.estimator = WaitEstimator()
        meter = metrics.get_meter("llmos.inference")
        self._inter_token = meter.create_histogram(
            "llmos.inference.inter_token_latency", unit="ms", description="time between a stream's tokens"
        )
        self._queue_time = meter.create_histogram(
            "llmos.inference.queue_time", unit="ms", description="arrival to admission into a decode slot"
        )
        self._batch_size = meter.create_histogram(
            "llmos.inference.batch_size", unit="{sequence}", description="sequences per decode step"
        )
        self._tokens = meter.create_counter(
            "llmos.inference.tokens_generated", unit="{token}", description="tokens generated"
        )
        self._preemptions = meter.create_counter(
            "llmos.inference.preemptions", unit="{sequence}", description="batch sequences parked for interactive work"
        )
        self._refusals = meter.create_counter(
            "llmos.inference.refusals", unit="{request}",
            description="requests refused at admission (reason: queue_full or expected_wait)",
        )
        self._step_time = meter.create_histogram(
            "llmos.inference.step_time", unit="ms", description="wall time of one decode step's model run"
        )
        # Read at export time from the running totals, so a step pays nothing for them.
        self._clock = _PhaseClock()
        meter.create_observable_counter(
            "llmos.inference.scheduler_time",
            callbacks=[lambda _: [metrics.Observation(seconds, {"phase": phase})
                                  for phase, seconds in self._clock.profile.wall_s.items()]],
            unit="s", description="wall time of the scheduler thread per phase: admit (admission and prefill), "
                                  "decode (the step's model run), sample, deliver (detokenize and hand to the stream)",
        )
        meter.create_observable_counter(
            "llmos.inference.scheduler_cpu_time",
            callbacks=[lambda _: [metrics.Observation(seconds, {"phase": phase})
                                  for phase, seconds in self._clock.profile.cpu_s.items()]],
            unit="s", description="CPU time of the scheduler thread per phase (ONNX Runtime's worker threads not included)",
        )
        meter.create_observable_counter(
            "llmos.inference.decode_rows",
            callbacks=[lambda _: [metrics.Observation(self._clock.profile.rows)]],
            unit="{row}", description="rows run by decode steps (over llmos.inference.batch_size's count: the mean batch)",
        )
        meter.create_observable_gauge(
            "llmos.inference.requests_running",
            callbacks=[lambda _: [metrics.Observation(len(self._running))]],
            description="sequences holding a decode slot",
        )
        meter.create_observable_gauge(
            "llmos.inference.requests_waiting",
            callbacks=[lambda _: [metrics.Observation(len(self._waiting))]],
            description="requests waiting for a decode slot",
        )

    def profile(self) -> StepProfile:
        """A copy of the scheduler thread's running totals per phase."""
        totals = self._clock.profile
        return StepProfile(totals.steps, totals.rows, dict(totals.wall_s), dict(totals.cpu_s))

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="generation-scheduler", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def submit(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Queue `request` and stream its events; closing the stream early cancels it."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        sequence = _Sequence(
            request=request,
            loop=loop,
            events=asyncio.Queue(),
            arrived=now,
            rng=np.random.default_rng(request.sampling.seed),
            deadline=request.deadline.at if request.deadline is not None else None,
            text=TextStream(self._tokenizer),
            outbox=self._outbox,
            rank=priority_rank(request.priority),
        )
        with self._condition:
            if self._stopping:
                raise Unavailable("the generation scheduler is shutting down")
            # Each priority class has its own bound, so a full bulk queue never refuses a chat.
            same_class = sum(1 for waiting in self._waiting if waiting.rank == sequence.rank)
            if same_class >= self._queue_size:
                self._refusals.add(1, {"reason": "queue_full", "priority": PRIORITY_NAMES[sequence.rank]})
                retry = (len(self._waiting) / self._max_batch + 1) * self._service_time_s
                raise ResourceExhausted(
                    f"the {PRIORITY_NAMES[sequence.rank]} generation queue is full "
                    f"({same_class} waiting, limit {self._queue_size})",
                    retry_after_s=retry,
                )
            self._refuse_a_long_wait(sequence, now)
            self._waiting.append(sequence)
            self._condition.notify()
        finished = False
        try:
            while True:
                event = await sequence.events.get()
                if isinstance(event, LlmosError):
                    finished = True
                    raise event
                finished = event.finish is not None
                yield event
                if finished:
                    return
        finally:
            if not finished:
                with self._condition:
                    sequence.cancelled = True  # the scheduler frees its slot at the next turn
                    self._condition.notify()

    def expected_wait_s(self, rank: int) -> float:
        """Seconds a new request of class `rank` is expected to wait for its slot and prompt."""
        # Running batch work is parked for an interactive request; batch work may not take the
        # reserved slots; prompts of a lower class being read in pieces wait for a new one's.
        # Within its class every waiting request counts as ahead (fair share may let a new
        # tenant pass some of them: the estimate errs long).
        running = [
            sequence.work() if sequence.rank <= rank else replace(sequence.work(), prefill_tokens=0)
            for sequence in list(self._running)
            if not (rank == INTERACTIVE_RANK and sequence.rank == BATCH_RANK)
        ]
        ahead = sorted((sequence for sequence in self._waiting if sequence.rank <= rank),
                       key=lambda waiting: (waiting.rank, waiting.arrived))
        slots = self._max_batch - (self._reserved_interactive if rank == BATCH_RANK else 0)
        return self.estimator.expected_wait(running, [sequence.work() for sequence in ahead], slots)

    def _batch_with(self, rank: int) -> int:
        """Rows a new request of class `rank` is expected to decode among."""
        return min(self._max_batch, len(self._running) + sum(1 for waiting in self._waiting if waiting.rank <= rank) + 1)

    def _refuse_a_long_wait(self, sequence: _Sequence, now: float) -> None:
        """Refuse `sequence` when it is expected to wait for its slot longer than its class's
        longest wait, or to finish after its deadline (called with the condition held). With a
        slot free and nobody waiting it never is: it starts at once, and nothing would make it faster."""
        max_wait = self._admission.for_rank(sequence.rank)
        if (max_wait is None and sequence.deadline is None) or (not self._waiting and len(self._running) < self._max_batch):
            return
        wait = self.expected_wait_s(sequence.rank)
        priority = PRIORITY_NAMES[sequence.rank]
        if max_wait is not None and wait > max_wait:
            self._refuse(priority, f"would wait about {wait:.1f} s for a decode slot, longer than the longest wait "
                                   f"allowed ({max_wait:.1f} s)", wait - max_wait)
        if sequence.deadline is not None:
            left = max(sequence.deadline - now, 0.0)
            done = wait + self.estimator.service_s(sequence.work(), self._batch_with(sequence.rank))
            if done > left:
                self._refuse(priority, f"would wait about {wait:.1f} s for a decode slot and finish in about "
                                       f"{done:.1f} s, after its deadline ({left:.1f} s)", done - left)

    def _refuse(self, priority: str, why: str, late_s: float) -> None:
        self._refusals.add(1, {"reason": "expected_wait", "priority": priority})
        raise ResourceExhausted(
            f"the generation service is at capacity: a {priority} request {why}",
            # By then the work ahead that makes it too late has been served.
            retry_after_s=max(late_s, self.estimator.step_s(self._max_batch)),
        )

    # The scheduler thread.

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self._waiting and not self._running:
                    self._condition.wait()
                if self._stopping:
                    break
            try:
                self._clock.start_turn()
                self._retire_gone()
                self._admit()
                self._hand_over()  # what admission refused or expired goes out before the step
                self._clock.lap("admit")
                if any(not sequence.prefilling for sequence in self._running):
                    self._step()
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("turn: %d running, %d waiting; ms %s; thread cpu ms %s", len(self._running),
                                 len(self._waiting), self._format(self._clock.turn_wall_s), self._format(self._clock.turn_cpu_s))
            except Exception:  # noqa: BLE001 - fail the requests in flight, keep serving
                logger.exception("generation step failed")
                for sequence in list(self._running):
                    sequence.send(Unavailable("generation failed; retry the request"))
                    self._remove(sequence)
                self._hand_over()
        self._cancel_all()

    def _hand_over(self) -> None:
        """Give the outbox's events to their streams: one wake-up of each event loop for all of them.

        A wake-up per token would make the loop's thread take the GIL from this one for every
        token; handed over at once, just before the next model run (which releases the GIL), the
        loop streams them while the model runs.
        """
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, StreamEvent | LlmosError]]] = {}
        for sequence, event in self._outbox:
            by_loop.setdefault(sequence.loop, []).append((sequence, event))
        self._outbox.clear()
        for loop, events in by_loop.items():
            loop.call_soon_threadsafe(_put_all, events)

    @staticmethod
    def _format(seconds: dict[str, float]) -> str:
        return " ".join(f"{phase}={value * 1000:.2f}" for phase, value in seconds.items())

    def _admit(self) -> None:
        """Give free slots to waiting requests, one decision at a time, and move prefills on.

        While streams decode, non-interactive prompts get PREFILL_CHUNK_TOKENS prompt tokens a
        turn, unfinished ones first; interactive prompts are prefilled whole, before them.
        """
        decoding = any(not sequence.prefilling for sequence in self._running)
        budget = PREFILL_CHUNK_TOKENS if decoding else self._decoder.max_context
        self._admit_waiting(0)
        for sequence in [sequence for sequence in self._running if sequence.prefilling]:
            if budget > 0:
                budget -= self._prefill(sequence, budget)
        self._admit_waiting(budget)

    def _admit_waiting(self, budget: int) -> None:
        """Admit waiting requests while slots are free; non-interactive ones only within `budget` prompt tokens."""
        while True:
            with self._condition:
                sequence = self._next_admission(chats_only=budget <= 0)
            if sequence is None:
                return
            if sequence.parked is not None:
                self._resume(sequence)
            elif sequence.rank == INTERACTIVE_RANK:
                self._take_slot(sequence)
                self._prefill(sequence, len(sequence.request.prompt_ids))
            else:
                self._take_slot(sequence)
                budget -= self._prefill(sequence, budget)

    def _next_admission(self, chats_only: bool) -> _Sequence | None:
        """The waiting request that takes a slot now, if any (called with the condition held)."""
        now = time.monotonic()
        for sequence in list(self._waiting):
            if sequence.cancelled:
                self._waiting.remove(sequence)
            elif sequence.deadline is not None and now >= sequence.deadline:
                self._waiting.remove(sequence)
                sequence.send(DeadlineExceeded("the deadline passed while the request waited for a slot"))
        if not self._waiting:
            return None
        best_rank = min(sequence.rank for sequence in self._waiting)
        if chats_only and best_rank != INTERACTIVE_RANK:
            return None
        free = self._max_batch - len(self._running)
        if best_rank == INTERACTIVE_RANK and free <= 0:
            free += self._preempt_batch()
        if free <= 0 or (best_rank == BATCH_RANK and free <= self._reserved_interactive):
            return None
        tenants = Counter(sequence.request.tenant for sequence in self._running)
        chosen = min(
            (sequence for sequence in self._waiting if sequence.rank == best_rank),
            key=lambda sequence: (tenants[sequence.request.tenant], sequence.arrived),
        )
        self._waiting.remove(chosen)
        return chosen

    def _preempt_batch(self) -> int:
        """Park one running batch sequence (of the tenant running the most, the newest); 1 if one was."""
        batch = [sequence for sequence in self._running if sequence.rank == BATCH_RANK]
        if not batch:
            return 0
        tenants = Counter(sequence.request.tenant for sequence in self._running)
        victim = max(batch, key=lambda sequence: (tenants[sequence.request.tenant], sequence.arrived))
        in_cache = [*victim.request.prompt_ids, *victim.generated][: victim.length]
        victim.parked = self._decoder.save_prefix(victim.row, in_cache)
        self._remove(victim)
        self._waiting.append(victim)
        self._preemptions.add(1)
        return 1

    def _resume(self, sequence: _Sequence) -> None:
        """Put a pre-empted sequence's cache back into a slot; it joins the next step."""
        assert sequence.parked is not None
        sequence.row = len(self._running)
        self._running.append(sequence)
        self._decoder.load_prefix(sequence.row, sequence.parked, sequence.length)
        sequence.parked = None

    def _take_slot(self, sequence: _Sequence) -> None:
        """Give a new request a row, with the longest cached prefix of its prompt already in it."""
        sequence.admitted = time.monotonic()
        self._queue_time.record(
            (sequence.admitted - sequence.arrived) * 1000, {"priority": PRIORITY_NAMES[sequence.rank]}
        )
        sequence.row = len(self._running)
        self._running.append(sequence)
        prompt = np.asarray(sequence.request.prompt_ids, dtype=np.int64)
        entry, common = self._prefix_cache.lookup(sequence.request.tenant, prompt)
        cached = max(0, min(common, len(prompt) - MIN_PREFILL_PIECE))
        if entry is not None:
            self._decoder.load_prefix(sequence.row, entry, cached)
        sequence.cached_tokens = sequence.prompt_done = sequence.length = cached
        self.estimator.observe_admission(len(prompt), cached)

    def _prefill(self, sequence: _Sequence, tokens: int) -> int:
        """Run up to `tokens` more prompt tokens into the sequence's row; returns how many ran.

        At the prompt's end it samples the first token.
        """
        prompt = np.asarray(sequence.request.prompt_ids, dtype=np.int64)
        started = sequence.prompt_done
        until = min(started + tokens, len(prompt))
        if 0 < len(prompt) - until < MIN_PREFILL_PIECE:
            until = len(prompt) - MIN_PREFILL_PIECE
        done = started
        began = time.monotonic()
        while done < until:
            end = min(done + PREFILL_CHUNK_TOKENS, until)
            logits = self._decoder.prefill(sequence.row, prompt[:end], cached=done)
            done = end
        self.estimator.observe_prefill(done - started, time.monotonic() - began)
        sequence.prompt_done = sequence.length = done
        if sequence.prefilling:
            return done - started
        if len(prompt) >= self._prefix_cache.min_tokens and sequence.cached_tokens < len(prompt) - MIN_PREFILL_PIECE:
            self._prefix_cache.add(sequence.request.tenant, self._decoder.save_prefix(sequence.row, prompt))
        self._accept(sequence, sample(logits, sequence.request.sampling, sequence.rng))
        self._hand_over()  # its first token, before the next prompt is read
        return done - started

    def _step(self) -> None:
        running = list(self._running)
        self._batch_size.record(len(running))
        logits = self._decoder.decode(
            [sequence.next_token for sequence in running], [sequence.length for sequence in running]
        )
        self._clock.lap("decode")
        step_s = self._clock.turn_wall_s["decode"]
        self._step_time.record(step_s * 1000)
        self.estimator.observe_step(len(running), step_s)
        self._clock.profile.steps += 1
        self._clock.profile.rows += len(running)
        rows = [row for row, sequence in enumerate(running) if not sequence.prefilling]
        # Every row's cache grew by this step before any finish moves a later row into a freed slot.
        for row in rows:
            running[row].length += 1
        tokens = self._sample_rows(logits, [running[row] for row in rows], rows)
        self._clock.lap("sample")
        for row, token in zip(rows, tokens, strict=True):
            self._accept(running[row], token)
        self._hand_over()
        self._clock.lap("deliver")

    @staticmethod
    def _sample_rows(logits: np.ndarray, sequences: list[_Sequence], rows: list[int]) -> list[int]:
        """The next token of each of `sequences` (rows `rows` of `logits`): the greedy ones by one
        argmax over the batch, the others each by their own sampling."""
        tokens = [0] * len(rows)
        greedy = [index for index, sequence in enumerate(sequences) if sequence.request.sampling.temperature == 0.0]
        if greedy:
            greedy_logits = logits if len(greedy) == logits.shape[0] else logits[[rows[index] for index in greedy]]
            for index, token in zip(greedy, np.argmax(greedy_logits, axis=1).tolist(), strict=True):
                tokens[index] = token
        for index, sequence in enumerate(sequences):
            if sequence.request.sampling.temperature != 0.0:
                tokens[index] = sample(logits[rows[index]], sequence.request.sampling, sequence.rng)
        return tokens

    def _accept(self, sequence: _Sequence, token: int) -> None:
        """Record a sampled token, stream what text is final, and finish the sequence if done."""
        now = time.monotonic()
        if sequence.first_token_at == 0.0:
            sequence.first_token_at = now
        else:
            self._inter_token.record((now - sequence.last_token_at) * 1000)
        sequence.last_token_at = now
        self._tokens.add(1)
        config = sequence.request.sampling
        finish: FinishReason | None = None
        if token in self._stop_ids:
            finish = FinishReason.STOP
        else:
            sequence.generated.append(token)
            sequence.unsent_ids.append(token)
            sequence.next_token = token
            sequence.text.add(token)
        text = sequence.text.text
        stop_at = min((i for i in (text.find(stop, max(0, sequence.sent_chars - len(stop))) for stop in config.stop) if i >= 0), default=-1)
        if stop_at >= 0:
            text, finish = text[:stop_at], FinishReason.STOP
        if finish is None and (
            len(sequence.generated) >= config.max_new_tokens or sequence.length + 1 >= self._decoder.max_context
        ):
            finish = FinishReason.LENGTH
        if finish is None and sequence.deadline is not None and now >= sequence.deadline:
            self._remove(sequence)
            sequence.send(DeadlineExceeded("the deadline passed during generation"))
            return
        if finish is None:
            # Hold back an incomplete character and any tail that could begin a stop string.
            holdback = max((len(stop) - 1 for stop in config.stop), default=0)
            final = len(text) - holdback
            if text.endswith(INCOMPLETE_CHARACTER) or final <= sequence.sent_chars:
                return
            sequence.send(StreamEvent(text[sequence.sent_chars:final], tuple(sequence.unsent_ids)))
            sequence.sent_chars, sequence.unsent_ids = final, []
            return
        self._remove(sequence)
        elapsed = now - sequence.admitted
        # Tokens sampled after the first: the generated ones, and a stop token that ended the stream.
        later_tokens = len(sequence.generated) + (token in self._stop_ids) - 1
        usage = Usage(
            prompt_tokens=len(sequence.request.prompt_ids),
            generated_tokens=len(sequence.generated),
            cached_prompt_tokens=sequence.cached_tokens,
            queue_ms=(sequence.admitted - sequence.arrived) * 1000,
            time_to_first_token_ms=(sequence.first_token_at - sequence.arrived) * 1000,
            tokens_per_second=len(sequence.generated) / elapsed if elapsed > 0 else 0.0,
            time_per_output_token_ms=(now - sequence.first_token_at) * 1000 / later_tokens if later_tokens > 0 else 0.0,
        )
        self._service_time_s = 0.8 * self._service_time_s + 0.2 * (now - sequence.admitted)
        self.estimator.observe_finish(sequence.rank, len(sequence.generated))
        sequence.send(StreamEvent(text[sequence.sent_chars:], tuple(sequence.unsent_ids), finish, usage))

    def _remove(self, sequence: _Sequence) -> None:
        """Free a slot at once: the last running sequence moves into it."""
        last = self._running[-1]
        if last is not sequence:
            self._decoder.move_row(last.row, sequence.row, last.length)
            last.row = sequence.row
            self._running[sequence.row] = last
        self._running.pop()
        sequence.row = -1

    def _retire_gone(self) -> None:
        """Free the slots of cancelled sequences, and of prompts still being read past their deadline."""
        now = time.monotonic()
        for sequence in [sequence for sequence in self._running if sequence.cancelled]:
            self._remove(sequence)
        for sequence in [sequence for sequence in self._running if sequence.prefilling
                         and sequence.deadline is not None and now >= sequence.deadline]:
            self._remove(sequence)
            sequence.send(DeadlineExceeded("the deadline passed while the prompt was being read"))

    def _cancel_all(self) -> None:
        with self._condition:
            pending = [*self._running, *self._waiting]
            self._running.clear()
            self._waiting.clear()
        for sequence in pending:
            sequence.send(StreamEvent("", (), FinishReason.CANCELLED, Usage(
                len(sequence.request.prompt_ids), len(sequence.generated), sequence.cached_tokens,
                0.0, 0.0, 0.0,
            )))
        self._hand_over()
