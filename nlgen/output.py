"""Rendering: results to stdout, everything else to a stderr console.

stdout carries only results and is flushed after each one, so a pipeline sees them as they
come. Notices, warnings and progress go to stderr through rich, which drops colour when the
stream is not a terminal or when NO_COLOR is set.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

from rich.console import Console
from rich.markup import escape

_stderr: Console | None = None


def stderr_console() -> Console:
    """The one stderr console (created lazily so tests that swap sys.stderr get theirs)."""
    global _stderr
    if _stderr is None or _stderr.file is not sys.stderr:
        _stderr = Console(stderr=True, highlight=False, soft_wrap=True)
    return _stderr


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def progress_enabled() -> bool:
    """Progress bars only on a terminal, and never under NO_COLOR or a dumb terminal."""
    return (stderr_is_terminal() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


def error(message: str, hint: str | None = None) -> None:
    """``Error: ...`` on stderr: one line, then the hint on its own line when there is one."""
    console = stderr_console()
    console.print(f"[bold red]Error:[/] {escape(message)}")
    if hint:
        console.print(f"[dim]Hint: {escape(hint)}[/]")


def notice(message: str) -> None:
    stderr_console().print(f"[yellow]nlgen:[/] {escape(message)}")


class _StderrHandler(logging.Handler):
    """Routes the core modules' log records (they never print) to the stderr console."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            notice(record.getMessage())
        except Exception:  # a broken stderr must not turn a notice into a crash
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("nlgen")
    logger.handlers[:] = [_StderrHandler()]
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


def write(text: str, stream: IO[str] | None = None) -> None:
    """Write a result to stdout and flush it at once (a pipeline sees it now)."""
    stream = stream or sys.stdout
    stream.write(text)
    stream.flush()


def write_jsonl(record: Mapping[str, Any], stream: IO[str] | None = None) -> None:
    write(json.dumps(record, ensure_ascii=False) + "\n", stream)
