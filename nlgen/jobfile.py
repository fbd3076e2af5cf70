"""Crash-safe JSONL output for long jobs: one record per line, resumable after a kill.

The records *are* the job's progress, so they are appended to the output file itself as they
come, each line in one ``write()``, rather than written to a temporary file renamed at the end
(the guide's rule for outputs that must appear whole): after a crash the file holds every record
finished so far, and ``--resume`` skips them. The one thing a kill can leave behind is a torn
last line; resuming cuts it off.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from nlgen.errors import OutputError

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


class ResumableWriter:
    """Append JSONL records to ``path``, one per key; with ``resume``, after those already there.

    ``key_field`` names the field (or fields, for a tuple key such as ``("index", "sequence")``)
    that identifies a record. Without ``resume`` an existing non-empty file is refused, so a
    finished job is never appended to by mistake.
    """

    def __init__(self, path: str | os.PathLike[str], key_field: str | Sequence[str], *,
                 resume: bool, fsync_every: int = FSYNC_EVERY,
                 fsync_interval_s: float = FSYNC_INTERVAL_S) -> None:
        self.path = Path(path)
        self.fields = (key_field,) if isinstance(key_field, str) else tuple(key_field)
        self.fsync_every = fsync_every
        self.fsync_interval_s = fsync_interval_s
        self._done: set[Hashable] = set()
        self.dropped_bytes = 0  # the torn last line cut off on resume
        if resume:
            self._recover()
        elif self._size() > 0:
            raise OutputError(f"{self.path} already exists and is not empty",
                              hint="pass --resume to continue that job, or remove the file")
        self.resumed = len(self._done)  # records found on resume
        try:
            # Unbuffered: each write() below is one system call carrying one whole line.
            self._file = open(self.path, "ab", buffering=0)  # closed in close()
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror}") from None
        self._unsynced = 0
        self._last_sync = time.monotonic()

    # ------------------------------------------------------------------------- reading back

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise OutputError(f"cannot read {self.path}: {exc.strerror}") from None

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
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
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
