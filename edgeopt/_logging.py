"""Logging setup for the `edgeopt` logger.

The library only attaches a `NullHandler`, so applications that embed edgeopt keep control of
logging. The CLI calls `configure_cli_logging` to print through rich and to mirror records into a
run's `run.log`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOGGER_NAME = "edgeopt"

logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """Return the logger for module `name` under the `edgeopt` logger."""
    if not name.startswith(LOGGER_NAME):
        name = f"{LOGGER_NAME}.{name}"
    return logging.getLogger(name)


def configure_cli_logging(quiet: bool = False, debug: bool = False) -> None:
    """Print `edgeopt` records on stderr through rich; level from flags or EDGEOPT_LOG_LEVEL."""
    from rich.console import Console
    from rich.logging import RichHandler

    root = logging.getLogger(LOGGER_NAME)
    for handler in list(root.handlers):
        if isinstance(handler, RichHandler):
            root.removeHandler(handler)
    level_name = os.environ.get("EDGEOPT_LOG_LEVEL", "").upper()
    if debug:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    elif level_name in logging.getLevelNamesMapping():
        level = logging.getLevelNamesMapping()[level_name]
    else:
        level = logging.INFO
    handler = RichHandler(
        console=Console(stderr=True), show_path=debug, show_time=False, markup=False
    )
    handler.setLevel(level)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    # The command line owns the process: some dependencies install handlers on the root
    # logger, and propagating there would print every record twice.
    root.propagate = False


class RunLogFile:
    """Context manager that copies every `edgeopt` record into a file while it is open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handler: logging.FileHandler | None = None

    def __enter__(self) -> RunLogFile:
        self._handler = logging.FileHandler(self.path, encoding="utf-8")
        self._handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        self._handler.setLevel(logging.DEBUG)
        root = logging.getLogger(LOGGER_NAME)
        root.addHandler(self._handler)
        if root.level == logging.NOTSET or root.level > logging.DEBUG:
            root.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handler is not None:
            logging.getLogger(LOGGER_NAME).removeHandler(self._handler)
            self._handler.close()
            self._handler = None
