"""Extraction and redaction in worker processes that can be killed.

Parsing a hostile document (HTML, PDF) or redacting its text is CPU work on attacker-chosen
input: in a thread it can neither be stopped nor kept off the event loop's GIL. Here each
document is prepared (extract → normalize → redact) in one of a few warm worker processes
(spawn context, started with the service); a document still running after `timeout_s` has its
worker killed and replaced, and is refused with InvalidArgument("extraction took longer than
N s"). The other documents in flight keep their own workers, so one slow document costs only
itself.

A worker is a plain `multiprocessing` process serving calls over a pipe, one at a time; the
parent waits for the answer in a thread, so the event loop never blocks on the pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from llmos.errors import InvalidArgument, LlmosError
from llmos.pii import Redactor
from services.ingest.chunking import normalize
from services.ingest.extract import ExtractionLimits

logger = logging.getLogger(__name__)

# (mime_type, content, limits) -> raw text; a module-level function, so a worker can import it.
Extractor = Callable[[str, bytes, ExtractionLimits], str]


@dataclass(frozen=True)
class Prepared:
    """A document's normalized, redacted text and how many personal-data findings were removed,
    with the seconds its extraction (with normalization) and its redaction took in the worker."""

    text: str
    redacted: int
    extract_s: float = 0.0
    redact_s: float = 0.0


def prepare(extract: Extractor, mime_type: str, content: bytes, limits: ExtractionLimits, redactor: Redactor) -> Prepared:
    """Extract, normalize and redact one document (what a worker runs)."""
    started = time.perf_counter()
    text = normalize(extract(mime_type, content, limits))
    if not text:
        raise InvalidArgument("content", "the document has no text once whitespace is removed")
    extracted = time.perf_counter()
    redaction = redactor.redact(text)
    return Prepared(redaction.text, len(redaction.findings), extracted - started, time.perf_counter() - extracted)


def _serve(connection: Connection) -> None:
    """A worker's loop: run each call and send back ("ok", value) or the error."""
    while True:
        try:
            function, args = connection.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[Any, ...] = ("ok", function(*args))
        except InvalidArgument as exc:
            # InvalidArgument does not survive pickling (two-argument constructor): send its parts.
            reply = ("invalid", exc.field, exc.message.removeprefix(f"{exc.field}: "))
        except Exception as exc:  # noqa: BLE001 - reported to the caller, the worker carries on
            reply = ("error", f"{type(exc).__name__}: {exc}")
        connection.send(reply)


class WorkerDied(LlmosError):
    """The worker process ended without answering (killed, out of memory, crashed)."""


class _Worker:
    def __init__(self, context: multiprocessing.context.SpawnContext) -> None:
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True, name="ingest-extract")
        self._process.start()
        child.close()

    def exchange(self, function: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Send one call and wait for its answer (blocking: run in a thread)."""
        try:
            self._connection.send((function, args))
            reply: tuple[Any, ...] = self._connection.recv()
        except (EOFError, OSError) as exc:
            raise WorkerDied(f"the extraction worker ended without answering ({type(exc).__name__})") from None
        return reply

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self._process.kill()
            self._process.join(5)
        with contextlib.suppress(Exception):
            self._connection.close()
        with contextlib.suppress(Exception):
            self._process.close()


class ExtractionWorkers:
    """`size` warm worker processes; `run` prepares a document in one within `timeout_s`."""

    def __init__(self, size: int, timeout_s: float) -> None:
        if size < 1:
            raise ValueError("at least one worker")
        self.size = size
        self.timeout_s = timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._idle: asyncio.Queue[_Worker] | None = None
        self._workers: list[_Worker] = []
        self._closed = False

    def start(self) -> None:
        """Start the processes (they import the extraction code while the service starts)."""
        if self._idle is not None:
            return
        self._idle = asyncio.Queue()
        for _ in range(self.size):
            self._idle.put_nowait(self._spawn())

    def _spawn(self) -> _Worker:
        worker = _Worker(self._context)
        self._workers.append(worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` in a worker (both picklable); InvalidArgument when it runs past the limit."""
        if self._closed:
            raise WorkerDied("the extraction workers are shut down")
        self.start()
        assert self._idle is not None
        worker = await self._idle.get()  # the limit runs from here: waiting for a free worker is not the document's fault
        if not worker.alive:  # died while idle
            self._retire(worker)
            worker = self._spawn()
        healthy = False
        started = time.monotonic()
        try:
            reply = await asyncio.wait_for(asyncio.to_thread(worker.exchange, function, args), self.timeout_s)
            healthy = True
        except TimeoutError:
            logger.warning("extraction ran past %.3g s after %.3f s: killing its worker", self.timeout_s, time.monotonic() - started)
            raise InvalidArgument("content", f"extraction took longer than {self.timeout_s:g} s") from None
        finally:
            if healthy and worker.alive:
                self._idle.put_nowait(worker)
            else:
                # Killed on timeout, cancelled mid-call (the answer would reach the next caller) or
                # died: a fresh process takes its place. Killing ends the waiting thread's recv too.
                self._retire(worker)
                if not self._closed:
                    self._idle.put_nowait(self._spawn())
        status, *values = reply
        if status == "ok":
            return values[0]
        if status == "invalid":
            raise InvalidArgument(values[0], values[1])
        raise WorkerDied(f"extraction failed ({values[0]})")

    async def close(self) -> None:
        """Kill every worker; documents still running fail with WorkerDied."""
        self._closed = True
        workers, self._workers = self._workers, []
        await asyncio.to_thread(lambda: [worker.kill() for worker in workers])


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Runs `function(*args)` in a thread, without a time limit: for tests that build the core
    without worker processes."""
    return await asyncio.to_thread(function, *args)


__all__ = ["ExtractionWorkers", "Extractor", "Prepared", "WorkerDied", "in_thread", "prepare"]
