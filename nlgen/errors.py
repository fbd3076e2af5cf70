"""Errors a user can cause or meet, each with its message and its exit code.

The CLI maps every ``NlgenError`` to one line on stderr (``Error: ...``, then a hint) and the
exit code below; anything else is a bug and shows its traceback only with ``NLGEN_DEBUG=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

# Documented exit codes (README, "Exit codes").
EXIT_OK = 0
EXIT_FAILURE = 1  # a runtime failure: model cannot load, file unreadable, ...
EXIT_USAGE = 2  # a bad option value, caught before any model loads
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class NlgenError(Exception):
    """Base class: a message for the user, an optional hint, an exit code."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(NlgenError):
    """A bad option value or combination (exit 2)."""

    exit_code = EXIT_USAGE


class InputError(NlgenError):
    """A missing, unreadable, empty or non-UTF-8 input (exit 1)."""


class ModelError(NlgenError):
    """A model that cannot be found or loaded (exit 1)."""


class OutputError(NlgenError):
    """An output that cannot be written, or would overwrite something (exit 1)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty.

    Library errors often carry pages of detail; the user gets the line that says what failed.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_failure(exc: BaseException, where: Path | None = None) -> str | None:
    """Why a write failed, in a few words, or None when ``exc`` is not a failed write.

    An OSError's strerror ("No space left on device"); safetensors' writer raises an error of
    its own that holds the OS error's text; torch's archive writer a RuntimeError ("unexpected
    pos ...") that says nothing, so a full file system at ``where`` is taken as the cause.
    """
    if isinstance(exc, OSError):
        return exc.strerror or first_line(exc)
    text = first_line(exc)
    if "No space left" in text or "StorageFull" in text:
        return "No space left on device"
    if type(exc).__name__ == "SafetensorError":
        return text
    if where is not None and disk_full(where):
        return "No space left on device"
    return None


def disk_full(path: Path) -> bool:
    """Is the file system that holds ``path`` (or its nearest existing parent) full, to a
    few megabytes?"""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False
    return stat.f_bavail * stat.f_frsize < 16 * 2**20
