"""Prompts and texts from arguments, files and stdin, decoded as strict UTF-8.

Readers take binary streams and decode themselves, so that a non-UTF-8 byte is reported with
its place (file, line) instead of surfacing as a UnicodeDecodeError traceback.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from nlgen.errors import InputError

STDIN = "-"


@dataclass(frozen=True)
class Text:
    """A whole input: its name (a path or "<stdin>") and its decoded text."""

    name: str
    text: str


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin is None or sys.stdin.isatty()
    except (AttributeError, ValueError):
        return True


def stdin_has_input() -> bool:
    """True when stdin is a pipe or a non-empty file: input that would be ignored if unread.

    /dev/null, a terminal or a closed stdin count as no input, so that scripts and CI jobs
    started without a stdin are not nagged.
    """
    if stdin_is_terminal():
        return False
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, ValueError, OSError):
        return True  # a stream without a descriptor (a test harness): it was given on purpose
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return True
    if stat.S_ISREG(mode):
        return os.fstat(sys.stdin.fileno()).st_size > 0
    return False


def utf8_error(where: str, raw: bytes, start: int, offset: int = 0) -> InputError:
    """The one message for a non-UTF-8 byte: where, which byte, at which offset, what to do.

    `start` indexes `raw`; `offset` is where `raw` begins in the file (for chunked readers).
    """
    return InputError(
        f"{where} is not valid UTF-8 (byte 0x{raw[start]:02x} at offset {offset + start})",
        hint="convert it first, e.g. iconv -f latin1 -t utf-8",
    )


def _decode(raw: bytes, where: str, first: bool) -> str:
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise utf8_error(where, raw, exc.start) from None


def _open_binary(name: str) -> BinaryIO:
    if name == STDIN:
        return sys.stdin.buffer
    path = Path(name)
    if path.is_dir():
        raise InputError(f"{name} is a directory, not a file")
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by the callers' context
    except FileNotFoundError:
        raise InputError(f"file not found: {name}") from None
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror}") from None


def display_name(name: str) -> str:
    return "<stdin>" if name == STDIN else name


def read_text(name: str) -> Text:
    """The whole of a file (or ``-``, stdin), strictly decoded."""
    stream = _open_binary(name)
    try:
        raw = stream.read()
    finally:
        if name != STDIN:
            stream.close()
    return Text(display_name(name), _decode(raw, display_name(name), first=True))


def iter_lines(name: str) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) for each line, read lazily.

    Lazy reading lets ``producer | nlgen generate`` start before the producer ends.
    """
    stream = _open_binary(name)
    try:
        for number, raw in enumerate(stream, 1):
            line = _decode(raw, f"{display_name(name)} line {number}", first=number == 1)
            yield number, line.rstrip("\r\n")
    finally:
        if name != STDIN:
            stream.close()


def iter_prompts(sources: Iterable[str], *, whole: bool = False) -> Iterator[str]:
    """Prompts from files (``-`` = stdin): one a line, blank lines skipped; or one per input."""
    for name in sources:
        if whole:
            text = read_text(name).text
            if text.strip():
                yield text.rstrip("\r\n")  # the file's final newline is not part of the prompt
            continue
        for _, line in iter_lines(name):
            if line.strip():
                yield line
