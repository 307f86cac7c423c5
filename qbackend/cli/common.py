"""What every command shares: the user-error type and the terminal output (tables, progress, JSON)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

EXIT_USAGE = 2

Step = Callable[[str], contextlib.AbstractContextManager]


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped output gets a wide page (rich would wrap at 80 columns and cut the layer names).
    width = None if stream.isatty() else 160
    return Console(file=stream, width=width, highlight=False)


@contextlib.contextmanager
def progress(total: int | None, quiet: bool) -> Iterator[Step]:
    """A rich progress display on stderr; yields ``step(description)`` (a context manager per stage)."""
    err = console(stderr=True)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]  # fmt: skip
    with Progress(*columns, console=err, transient=True, disable=quiet) as bar:
        task = bar.add_task("starting", total=total)

        @contextlib.contextmanager
        def step(description: str) -> Iterator[None]:
            bar.update(task, description=description)
            t = time.perf_counter()
            yield
            bar.advance(task)
            if not quiet:  # a permanent line per finished stage: the user sees where the time went
                err.print(f"[green]✓[/green] {description} [dim]({time.perf_counter() - t:.1f} s)[/dim]")

        yield step


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))
