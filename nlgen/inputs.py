"""THE input layer: prompts, texts and training data from arguments, files, directories, stdin.

Every command reads through here, so every command gives the same answers for the same bad
input (a missing file, a directory, an empty or non-UTF-8 file, a .jsonl line that is not JSON).
Readers take binary streams and decode themselves, so that a non-UTF-8 byte is reported with
its place (file, line, offset) instead of surfacing as a UnicodeDecodeError traceback.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from nlgen.errors import InputError

STDIN = "-"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")  # what a directory input contributes


@dataclass(frozen=True)
class Text:
    """One text to work on: where it came from, and its content or why it could not be read."""

    name: str  # a path or "<stdin>"
    text: str = ""
    line: int | None = None  # one text a line: its line number in `name`
    error: str | None = None  # why it could not be read (then `text` is empty)
    hint: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.line is None else f"{self.name}:{self.line}"


@dataclass(frozen=True)
class Prompt:
    """One prompt, and the line it was read from (None for an argument or a whole file)."""

    text: str
    line: int | None = None
    # A chat (a jsonl record's `messages`): rendered with the model's chat template; `text` is
    # then its last message, for display.
    messages: tuple[dict[str, str], ...] | None = None


# ----------------------------------------------------------------------------- stdin


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


def display_name(name: str) -> str:
    return "<stdin>" if name == STDIN else name


# ----------------------------------------------------------------------------- reading


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


def check_file(name: str) -> Path:
    """The path of an input file that exists and is not a directory; the one set of messages.

    Only the file's existence and type are checked: opening it here would drain a FIFO such as
    ``<(producer)`` before the command reads it.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        raise InputError(f"{name} is a directory, not a file")
    if not path.exists():
        raise InputError(f"file not found: {name}")
    return path


def _open_binary(name: str) -> BinaryIO:
    if name == STDIN:
        return sys.stdin.buffer
    path = check_file(name)
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by the callers' context
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror}") from None


def read_text(name: str) -> Text:
    """The whole of a file (or ``-``, stdin), strictly decoded."""
    stream = _open_binary(name)
    try:
        raw = stream.read()
    except OSError as exc:
        raise InputError(f"cannot read {display_name(name)}: {exc.strerror}") from None
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


def iter_prompts(sources: Iterable[str], *, whole: bool = False) -> Iterator[Prompt]:
    """Prompts from files (``-`` = stdin): one a line, or one per input (``whole``).

    Blank lines are not prompts: they are skipped, and the line number of each prompt says
    where it was, so that a record can be traced to its line.
    """
    for name in sources:
        if whole:
            text = read_text(name).text
            if text.strip():
                yield Prompt(text.rstrip("\r\n"))  # the final newline is not in the prompt
            continue
        for number, line in iter_lines(name):
            if line.strip():
                yield Prompt(line, number)


def is_jsonl(name: str) -> bool:
    """A file read as JSON records (one a line) rather than as text: by its suffix."""
    return name != STDIN and name.lower().endswith(".jsonl")


def iter_texts(sources: Iterable[str], *, per_line: bool = False) -> Iterator[Text]:
    """Texts from files (``-`` = stdin): one per file, or one per non-blank line (``per_line``).

    A file that cannot be read becomes a Text with an error, in its place, so that the other
    inputs are still processed and the output keeps the input order. Reading is lazy.
    """
    for name in sources:
        shown = display_name(name)
        try:
            if per_line:
                for number, line in iter_lines(name):
                    if line.strip():
                        yield Text(shown, line, line=number)
            else:
                yield read_text(name)
        except InputError as exc:
            yield Text(shown, error=exc.message, hint=exc.hint)


@dataclass(frozen=True)
class Record:
    """One line of a .jsonl input: its fields, or why it is not a record (then `fields` is None).

    Blank lines are not records. A bad line (not UTF-8, not JSON, not an object) is a Record
    with an error, in its place, so a command can report it and carry on with the next line.
    """

    name: str  # a path or "<stdin>"
    line: int
    fields: dict[str, Any] | None = None
    problem: str | None = None  # what is wrong with the line ("not JSON (...)")
    hint: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}:{self.line}"

    @property
    def error(self) -> str | None:
        """The problem, with where it is: ``data.jsonl:3: not JSON (...)``."""
        return f"{self.label}: {self.problem}" if self.problem else None


def iter_records(name: str) -> Iterator[Record]:
    """The records of a .jsonl file (``-`` = stdin), one a non-blank line, read lazily.

    Each line is decoded and parsed on its own, so one bad line costs that line only. A file
    that cannot be opened raises InputError (nothing of it can be read).
    """
    shown = display_name(name)
    stream = _open_binary(name)
    try:
        for number, raw in enumerate(stream, 1):
            try:
                line = _decode(raw, f"{shown} line {number}", first=number == 1)
            except InputError as exc:
                problem = exc.message.split(" is ", 1)[-1]  # "not valid UTF-8 (byte ...)"
                yield Record(shown, number, problem=problem, hint=exc.hint)
                continue
            if line.strip():
                yield parse_record(shown, number, line)
    finally:
        if name != STDIN:
            stream.close()


def parse_record(name: str, number: int, line: str) -> Record:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as exc:
        return Record(name, number, problem=f"not JSON ({exc.msg}, column {exc.colno})",
                      hint="one JSON object a line; plain text needs --text")
    if not isinstance(fields, dict):
        return Record(name, number, problem=f"a JSON {_json_type(fields)}, not an object",
                      hint='one object a line: {"field": value, ...}')
    return Record(name, number, fields)


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------- training data


@dataclass(frozen=True)
class Source:
    """One checked data file: where it is, how to read it, and its fingerprint for the record."""

    name: str  # as given (a path, or "<stdin>")
    path: Path | None  # None for stdin
    kind: str  # "text" | "jsonl" | "csv"
    sha256: str
    size: int
    text: str | None = None  # stdin's content (it cannot be read twice)


def expand(name: str) -> list[tuple[str, Path | None]]:
    """A file, or the text files of a directory (recursively, hidden ones skipped), or stdin."""
    if name == STDIN:
        return [(name, None)]
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise InputError(f"directory {name} holds no text files",
                             hint="it is searched for " + ", ".join(TEXT_SUFFIXES))
        return [(str(p), p) for p in files]
    if not path.exists():
        raise InputError(f"file not found: {name}")
    if not path.is_file():
        raise InputError(f"{name} is not a regular file")
    return [(name, path)]


def _scan(name: str, path: Path) -> tuple[str, int, bool]:
    """sha256, size and "holds non-blank text", reading in chunks; non-UTF-8 is an error."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    has_text = False
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    raise utf8_error(name, chunk, exc.start, offset) from None
                has_text = has_text or bool(text.strip())
                offset += len(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise InputError(f"{name} is not valid UTF-8 (it ends inside a character)",
                                 hint="the file may be truncated") from None
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror}") from None
    return digest.hexdigest(), offset, has_text


def _check_jsonl(name: str, path: Path, text_field: str) -> None:
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{name} line {number} is not JSON: {exc.msg}") from None
            if not isinstance(row, dict) or text_field not in row:
                fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise InputError(f"{name} line {number} has no {text_field!r} field "
                                 f"(it has: {fields})",
                                 hint="name the field that holds the text with --text-field")
            if not isinstance(row[text_field], str):
                raise InputError(f"{name} line {number}: field {text_field!r} is not a string")


def _check_csv(name: str, path: Path, text_field: str) -> None:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        if text_field not in header:
            raise InputError(f"{name} has no {text_field!r} column (it has: "
                             f"{', '.join(header)})",
                             hint="name the column that holds the text with --text-field")
        for row in rows:
            if len(row) > len(header):
                raise InputError(f"{name} line {rows.line_num} has {len(row)} fields, its header "
                                 f"{len(header)}", hint="quote fields that hold commas")


def _kind(path: Path) -> str:
    return {".jsonl": "jsonl", ".csv": "csv"}.get(path.suffix.lower(), "text")


def check_sources(names: Iterable[str], text_field: str | None) -> list[Source]:
    """Every input exists, is UTF-8 and holds text (and the text field, for jsonl/csv, unless
    ``text_field`` is None: records, or a format still to be told; see check_text_field)."""
    sources: list[Source] = []
    for given in names:
        for name, path in expand(given):
            if path is None:
                text = read_text(STDIN).text
                raw = text.encode("utf-8")
                if not text.strip():
                    raise InputError("stdin is empty: no text to train on")
                sources.append(Source("<stdin>", None, "text", hashlib.sha256(raw).hexdigest(),
                                      len(raw), text))
                continue
            sha, size, has_text = _scan(name, path)
            if size == 0 or not has_text:
                raise InputError(f"{name} is empty: no text to train on")
            sources.append(Source(name, path, _kind(path), sha, size))
            if text_field is not None:
                check_text_field(sources[-1], text_field)
    return sources


def check_text_field(source: Source, text_field: str) -> None:
    """A .jsonl or .csv source holds ``text_field`` as a string in every record."""
    if source.kind == "jsonl" and source.path is not None:
        _check_jsonl(source.name, source.path, text_field)
    elif source.kind == "csv" and source.path is not None:
        _check_csv(source.name, source.path, text_field)
