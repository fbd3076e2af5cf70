"""Crash-safe JSONL output for long jobs: one record per line, resumable after a kill.

The records *are* the job's progress, so they are appended to the output file itself as they
come, each line in one ``write()``, rather than written to a temporary file renamed at the end
(the guide's rule for outputs that must appear whole): after a crash the file holds every record
finished so far, and ``--resume`` skips them. The one thing a kill can leave behind is a torn
last line; resuming cuts it off.

A job's identity (:class:`JobIdentity`: its command, its input's sha256, its model, every option
that changes its records) is kept beside the output, in ``OUT.job.json``; ``--resume`` compares
it with the job asked for now and refuses another job, so that one file never mixes the answers
of two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from nlgen import jsonl
from nlgen.errors import InputError, OutputError, UsageError
from nlgen.inputs import STDIN

log = logging.getLogger("nlgen")

# write() hands each line to the kernel at once: a kill -9 loses nothing written, as the page
# cache survives the process. fsync only guards against a machine crash or power cut, and costs
# a round trip to the disk (about a millisecond on an SSD, far more on network filesystems): per
# record it would dominate fast jobs (perplexity per line). So: every N records or T seconds,
# and on close; a power cut then loses at most that much, which --resume redoes.
FSYNC_EVERY = 64
FSYNC_INTERVAL_S = 5.0


def _freeze(value: Any) -> Hashable:
    """A key made hashable and comparable with one read back from JSON: lists become tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        raise TypeError("a record key cannot be an object")
    return value


# ----------------------------------------------------------------------------- job identity

SIDECAR_SUFFIX = ".job.json"  # OUT.jsonl -> OUT.jsonl.job.json
PARTS = ("command", "input", "model", "options")  # what defines a job, compared on --resume


@dataclass(frozen=True)
class JobIdentity:
    """What defines a job, so that ``--resume`` can tell it is the same one.

    ``options`` holds every option that changes the records (not those that only change speed,
    such as the batch size). The input is described by its sha256 and size, computed only when
    :meth:`describe` is called (on the process that writes the output); with ``named``, the
    input names are part of it too (perplexity's records are keyed by them). ``arguments``:
    prompts given on the command line instead of files.
    """

    command: str
    model: str | None
    options: Mapping[str, Any] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    arguments: tuple[str, ...] | None = None
    named: bool = False

    @property
    def reads_stdin(self) -> bool:
        return self.arguments is None and STDIN in self.files

    def describe(self) -> dict[str, Any]:
        """The identity as plain JSON (what ``OUT.job.json`` keeps)."""
        return json.loads(json.dumps({"command": self.command, "input": self._input(),
                                      "model": model_key(self.model),
                                      "options": dict(self.options)},
                                     default=str))

    def _input(self) -> dict[str, Any]:
        if self.reads_stdin:
            return {"stdin": True}  # read as it comes: it cannot be hashed ahead
        digest = hashlib.sha256()
        if self.arguments is not None:
            digest.update(json.dumps(self.arguments).encode("utf-8"))
            return {"sha256": digest.hexdigest(), "prompts": len(self.arguments)}
        size = 0
        for name in self.files:
            if self.named:
                digest.update(f"\0{name}\0".encode())
            size += _hash_file(name, digest)
        return {"sha256": digest.hexdigest(), "bytes": size}


def model_key(model: str | None) -> str | None:
    """A ``--model`` (or ``--reference``) as a job records it: a local path made absolute, so
    that the same directory named from elsewhere is the same model; anything else as given."""
    if model and os.path.exists(os.path.expanduser(model)):
        return os.path.abspath(os.path.expanduser(model))
    return model


def _hash_file(name: str, digest: Any) -> int:
    """Add a file's bytes to ``digest``; its size. A file that cannot be read adds its error
    (the command reports it in its place)."""
    size = 0
    try:
        with open(os.path.expanduser(name), "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        digest.update(f"\0unreadable: {exc.strerror}\0".encode())
    return size


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where the identity of the job writing ``path`` is kept."""
    return Path(f"{os.fspath(path)}{SIDECAR_SUFFIX}")


def _read_job(path: Path) -> dict[str, Any] | None:
    side = sidecar_path(path)
    try:
        recorded = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not JSON"
        raise InputError(f"cannot read {side}: {reason}",
                         hint=f"it records which job wrote {path}; remove both to start "
                              "over") from None
    return recorded if isinstance(recorded, dict) else {}


def _write_job(path: Path, record: Mapping[str, Any]) -> None:
    """``OUT.job.json``, whole or not at all: a temporary sibling, fsynced, renamed."""
    side = sidecar_path(path)
    temporary = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, side)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot write {side}: {exc.strerror}") from None


def _check_same_job(path: Path, recorded: dict[str, Any] | None,
                    identity: dict[str, Any]) -> None:
    """Refuse (exit 2) to resume ``path`` for a job other than the one that wrote it."""
    if recorded is None:
        raise UsageError(f"--resume: {path} has no job record ({sidecar_path(path).name}), so "
                         "nothing tells that this job wrote it",
                         hint="write it again without --resume (remove the file first)")
    differ = [_difference(part, recorded.get(part), identity[part]) for part in PARTS
              if recorded.get(part) != identity[part]]
    if differ:
        raise UsageError(f"--resume: this is not the job that wrote {path}: "
                         + "; ".join(differ),
                         hint="resume with the input, model and options of that job, or "
                              "write to another --output")


def _difference(part: str, then: Any, now: Any) -> str:
    """``the options differ (num_return_sequences 1 then, 2 now)``."""
    if isinstance(then, dict) and isinstance(now, dict):
        keys = [k for k in {**then, **now} if then.get(k) != now.get(k)]
        shown = ", ".join(f"{_name(part, k)} {_short(then.get(k))} then, "
                          f"{_short(now.get(k))} now" for k in keys)
    else:
        shown = f"{_short(then)} then, {_short(now)} now"
    verb = "differ" if part.endswith("s") else "differs"
    return f"the {part} {verb} ({shown})"


def _name(part: str, key: str) -> str:
    """An option as the command line spells it (``--num-return-sequences``, ``-o``)."""
    if part != "options":
        return key
    return "-o" if key == "extra" else "--" + key.replace("_", "-")


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12]
    return "none" if value is None else json.dumps(value) if not isinstance(value, str) \
        else value


class ResumableWriter:
    """Append JSONL records to ``path``, one per key; with ``resume``, after those already there.

    ``key_field`` names the field (or fields, for a tuple key such as ``("index", "sequence")``)
    that identifies a record. Without ``resume`` an existing non-empty file is refused, so a
    finished job is never appended to by mistake.

    ``identity`` (a :meth:`JobIdentity.describe`): kept in ``OUT.job.json`` with a job id drawn
    at the start (:attr:`job_id`, which a resumed job keeps); ``resume`` of a non-empty file
    refuses (exit 2) a job whose identity differs, or a file without one, before touching it.
    """

    def __init__(self, path: str | os.PathLike[str], key_field: str | Sequence[str], *,
                 resume: bool, identity: dict[str, Any] | None = None,
                 fsync_every: int = FSYNC_EVERY,
                 fsync_interval_s: float = FSYNC_INTERVAL_S) -> None:
        self.path = Path(path)
        self.fields = (key_field,) if isinstance(key_field, str) else tuple(key_field)
        self.fsync_every = fsync_every
        self.fsync_interval_s = fsync_interval_s
        self._done: set[Hashable] = set()
        self.dropped_bytes = 0  # the torn last line cut off on resume
        self.job_id = secrets.token_hex(6)
        size = self._size()
        if resume and identity is not None and identity["input"].get("stdin"):
            raise UsageError("--resume cannot tell that stdin holds the input of the job it "
                             "continues", hint="save the input to a file and run the job from it")
        recorded = None
        if resume and size > 0 and identity is not None:
            recorded = _read_job(self.path)
            _check_same_job(self.path, recorded, identity)
            self.job_id = str((recorded or {}).get("job_id") or self.job_id)
        if resume:
            self._recover()
        elif size > 0:
            raise OutputError(f"{self.path} already exists and is not empty",
                              hint="pass --resume to continue that job, or remove the file")
        self.resumed = len(self._done)  # records found on resume
        try:
            # Unbuffered: each write() below is one system call carrying one whole line.
            self._file = open(self.path, "ab", buffering=0)  # closed in close()
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror}") from None
        if identity is not None and recorded is None:
            try:
                _write_job(self.path, {"job_id": self.job_id, **identity})
            except OutputError:
                self._file.close()
                raise
        self._unsynced = 0
        self._last_sync = time.monotonic()

    # ------------------------------------------------------------------------- reading back

    def _size(self) -> int:
        """The output's size; 0 when it is not there yet. A path that can hold no output file
        (under a file, a directory) cannot be written."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror}") from None
        if stat.S_ISDIR(info.st_mode):
            raise OutputError(f"cannot write {self.path}: Is a directory",
                              hint="--output names the file to write")
        return info.st_size

    def _recover(self) -> None:
        """Collect the keys already written; cut off a torn last line (left by a kill)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise OutputError(f"cannot read {self.path}: {exc.strerror}") from None
        # Every record ends with a newline, written in the same call: whatever follows the last
        # newline is a record that was cut short, and will be done again.
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self.dropped_bytes = len(data) - end
            log.warning("%s: dropped an unfinished last record (%d bytes) left by an "
                        "interrupted run", self.path, self.dropped_bytes)
            self._truncate(end)
        for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self._done.add(self.key(record))
            except (ValueError, KeyError, TypeError):
                raise OutputError(f"{self.path}, line {number}: not a record of this job "
                                  f"(a JSON object with {', '.join(self.fields)})",
                                  hint="resume only with the file the job itself wrote") from None

    def _truncate(self, size: int) -> None:
        try:
            with open(self.path, "r+b") as f:
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OutputError(f"cannot repair {self.path}: {exc.strerror}") from None

    # ------------------------------------------------------------------------- the API

    def key(self, record: Mapping[str, Any]) -> Hashable:
        """The key of ``record``: one field's value, or a tuple of several."""
        if not isinstance(record, Mapping):
            raise TypeError("a record is a JSON object")
        values = [_freeze(record[name]) for name in self.fields]
        return values[0] if len(values) == 1 else tuple(values)

    def done(self, key: Any) -> bool:
        """Whether a record with this key is in the file (written before, or now)."""
        return _freeze(key) in self._done

    @property
    def done_keys(self) -> frozenset[Hashable]:
        """Every key written so far (to broadcast to other ranks on resume)."""
        return frozenset(self._done)

    def write(self, record: Mapping[str, Any]) -> bool:
        """Append ``record`` as one line; False (nothing written) when its key is done already.

        Skipping duplicates keeps every key exactly once when resumed work overlaps what was
        written (a prompt whose first sequences were saved before the kill is generated again).
        """
        key = self.key(record)
        if key in self._done:
            return False
        line = (jsonl.dumps(record) + "\n").encode("utf-8")
        try:
            view = memoryview(line)
            while view:  # a regular file takes it all at once; loop in case it does not
                view = view[self._file.write(view):]
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror}") from None
        self._done.add(key)
        self._unsynced += 1
        if (self._unsynced >= self.fsync_every
                or time.monotonic() - self._last_sync >= self.fsync_interval_s):
            self.sync()
        return True

    def sync(self) -> None:
        """Force the records written so far to the disk."""
        if self._unsynced:
            try:
                os.fsync(self._file.fileno())
            except OSError as exc:
                raise OutputError(f"cannot write {self.path}: {exc.strerror}") from None
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self.sync()
        finally:
            self._file.close()

    def __enter__(self) -> ResumableWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
