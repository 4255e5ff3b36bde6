"""How `llmos` commands print: rich tables and progress bars for people, one JSON document for
programs (`--json`), and the one spelling of the API key option."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

# Wide enough that a table piped to a file or `grep` keeps each row on one line.
PIPED_WIDTH = 1000


def add_api_key_option(parser: argparse.ArgumentParser, help_text: str = "") -> argparse.ArgumentParser:
    """`--api-key`: the key every command that calls the platform presents."""
    parser.add_argument(
        "--api-key", default="", help=help_text or "API key (default: LLMOS_API_KEY, else the first admin key configured)"
    )
    return parser


def add_json_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    return parser


def stdout_console() -> Console:
    """The console tables go to: the terminal's width, or one line per row when piped."""
    return Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> None:
    table = Table(*header, title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for row in rows:
        table.add_row(*row)
    stdout_console().print(table)


def print_json(document: Any) -> None:
    """`document` as JSON on stdout, nothing else there (progress and warnings go to stderr)."""
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class ProgressBar:
    """One bar of a `progress_bars` display."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def advance(self, count: int = 1) -> None:
        self._progress.advance(self._task, count)


class ProgressBars:
    """Progress bars on stderr, several at once (submitted, indexed…); on a terminal they move,
    in a log file only their final state is written."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def bar(self, label: str, total: int) -> ProgressBar:
        return ProgressBar(self._progress, self._progress.add_task(label, total=total))


@contextmanager
def progress_bars() -> Iterator[ProgressBars]:
    progress = Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with progress:
        yield ProgressBars(progress)
