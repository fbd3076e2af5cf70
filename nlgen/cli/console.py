"""Rendering: results to stdout, everything else to a stderr console.

stdout carries only results and is flushed after each one, so a pipeline sees them as they
come. Notices, warnings and progress go to stderr through rich. Colour, styles and progress
bars appear only on a terminal, and never when NO_COLOR is set.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn

from nlgen import jsonl
from nlgen.errors import OutputError

_stderr: Console | None = None
_quiet = False  # --quiet: notices are dropped, errors still shown
_stdout_mid_line = False  # the last result written to stdout did not end its line


def no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def stderr_console() -> Console:
    """The one stderr console (created lazily so tests that swap sys.stderr get theirs)."""
    global _stderr
    if _stderr is None or _stderr.file is not sys.stderr:
        _stderr = Console(stderr=True, highlight=False, soft_wrap=True,
                          color_system=None if no_color() else "auto")
    return _stderr


class StdoutError(OutputError):
    """stdout refused a write (a full disk, an I/O error): the results cannot reach the user.

    A reader that closed the pipe is not one: that stays a BrokenPipeError (exit 0).
    """

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"cannot write to stdout: {exc.strerror or exc}")


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit cannot fail again (after a closed
    pipe or a full disk: what is still buffered has nowhere to go)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a real file descriptor (CliRunner): nothing will be flushed to a pipe


class _StdoutConsole(Console):
    """A rich console on stdout whose failed writes are a StdoutError (exit 1) and whose closed
    pipe is a BrokenPipeError (exit 0), as for every other result; rich exits 1 on the latter."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().print(*args, **kwargs)
        except BrokenPipeError:
            raise
        except OSError as exc:
            silence_stdout()
            raise StdoutError(exc) from None

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def stdout_console() -> Console:
    """A console for results that are tables: no escape codes at all under NO_COLOR.

    Off a terminal rich assumes 80 columns and would crop the numbers; a file gets them all.
    """
    return _StdoutConsole(width=None if stdout_is_terminal() else 160, highlight=False,
                          color_system=None if no_color() else "auto")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def stderr_is_terminal() -> bool:
    return _isatty(sys.stderr)


def stdout_is_terminal() -> bool:
    return _isatty(sys.stdout)


def progress_enabled() -> bool:
    """Progress bars only on a terminal, and never under NO_COLOR or a dumb terminal."""
    return stderr_is_terminal() and not no_color() and os.environ.get("TERM") != "dumb"


def error(message: str, hint: str | None = None) -> None:
    """``Error: ...`` on stderr: one line, then the hint on its own line when there is one."""
    console = stderr_console()
    console.print(f"[bold red]Error:[/] {escape(message)}")
    if hint:
        console.print(f"[dim]Hint: {escape(hint)}[/]")


def notice(message: str) -> None:
    if not _quiet:
        stderr_console().print(f"[yellow]nlgen:[/] {escape(message)}")


def say(text: str) -> None:
    """A plain line of progress on stderr (not a notice: no prefix), unless --quiet."""
    if not _quiet:
        stderr_console().print(escape(text))


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``1 sequence``, ``3 sequences``."""
    return f"{count:,} {noun if count == 1 else (many or noun + 's')}"


def summary(model: str, device: str, dtype: str, detail: str) -> None:
    """The closing line of a command: which model ran where, and what it did."""
    notice(f"{model} on {device} ({dtype}): {detail}")


class _StderrHandler(logging.Handler):
    """Routes the core modules' log records (they never print) to the stderr console."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            notice(record.getMessage())
        except Exception:  # a broken stderr must not turn a notice into a crash
            self.handleError(record)


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    global _quiet
    _quiet = quiet
    logger = logging.getLogger("nlgen")
    logger.handlers[:] = [_StderrHandler()]
    logger.setLevel(logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


def write(text: str, stream: IO[str] | None = None) -> None:
    """Write a result to stdout and flush it at once (a pipeline sees it now)."""
    global _stdout_mid_line
    stream = stream or sys.stdout
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        if stream is sys.stdout:
            silence_stdout()
        raise StdoutError(exc) from None
    if text:
        _stdout_mid_line = not text.endswith(("\n", "\0"))


def end_line() -> None:
    """After an interruption: end a line left open by streamed text, so the shell prompt and
    the next tool's input start on a line of their own."""
    global _stdout_mid_line
    if _stdout_mid_line:
        write("\n")
        _stdout_mid_line = False


def write_jsonl(record: Mapping[str, Any], stream: IO[str] | None = None) -> None:
    write(jsonl.dumps(record) + "\n", stream)


class ProgressBar:
    """A rich progress bar on stderr, started on the first update; nothing off a terminal."""

    def __init__(self, label: str, *extra: ProgressColumn, transient: bool = True) -> None:
        self.columns: tuple[ProgressColumn, ...] = (TextColumn(label), BarColumn(),
                                                    MofNCompleteColumn(), *extra)
        self.transient = transient
        self._progress: Progress | None = None
        self._task: Any = None

    def update(self, done: int, total: int, **fields: Any) -> None:
        if self._progress is None:
            self._progress = Progress(*self.columns, console=stderr_console(),
                                      transient=self.transient)
            self._task = self._progress.add_task("", total=total, **fields)
            self._progress.start()
        self._progress.update(self._task, completed=done, total=total, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
