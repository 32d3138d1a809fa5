"""Progress bars for long stages, drawn with rich on stderr.

Bars show when stderr is a terminal, unless turned off with `set_progress(False)` (the CLI's
`--quiet` and `--json` do that). Logging still goes through the `edgeopt` logger.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar

_enabled: ContextVar[bool | None] = ContextVar("edgeopt_progress", default=None)


def set_progress(enabled: bool | None) -> None:
    """Force progress bars on or off; None restores the default (on for a terminal)."""
    _enabled.set(enabled)


def progress_enabled() -> bool:
    value = _enabled.get()
    return sys.stderr.isatty() if value is None else value


class _Task:
    def __init__(self, progress: object | None, task_id: object | None) -> None:
        self._progress = progress
        self._task_id = task_id

    def advance(self, steps: float = 1, **fields: object) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, advance=steps, **fields)  # type: ignore[attr-defined]


@contextlib.contextmanager
def progress_task(description: str, total: float | None) -> Iterator[_Task]:
    """Yield a task whose `advance` moves a rich progress bar, or does nothing when disabled."""
    if not progress_enabled():
        yield _Task(None, None)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task_id = progress.add_task(description, total=total, status="")
        yield _Task(progress, task_id)
