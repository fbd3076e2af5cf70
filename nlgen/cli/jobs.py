"""What generate, perplexity and score share on the command line: launchers, jobs, progress.

Under ``torchrun`` or ``accelerate launch`` every process runs the same command; rank 0 alone
prints results, notices, progress and errors (``cli/runtime.py`` quiets the others, whose
failures reach rank 0 through nlgen.jobs.parallel).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import TextColumn, TimeRemainingColumn

from nlgen import inputs
from nlgen.cli import comparison, console, runtime
from nlgen.cli.options import ScoringJob
from nlgen.jobs import distributed, parallel
from nlgen.jobs.jobfile import JobIdentity, model_key
from nlgen.models import devices


@contextmanager
def launched(device: str) -> Iterator[str]:
    """This process's device (its own GPU under a launcher) inside its process group.

    With one process: ``device`` unchanged and no group (nothing is imported).

    A process that joined a group ends without the interpreter's teardown
    (:func:`runtime.exit_fast_when_done`): some abort in it after a clean
    ``destroy_process_group`` ("terminate called without an active exception", SIGABRT, seen in
    a few percent of two-rank CPU runs with torch 2.13), in the teardown of gloo's C++ objects
    (as pytorch/pytorch#179291 describes). Processes that did not join a group (finetune's, set
    up by accelerate) exit normally.
    """
    rank_device = distributed.device_for_rank(device)
    created = distributed.init(rank_device)
    if created:
        runtime.exit_fast_when_done()
    try:
        yield rank_device
    finally:
        if created:
            distributed.shutdown()


@contextmanager
def scoring(job: ScoringJob, files: list[str] | None) -> Iterator[str]:
    """How perplexity and score start: what can be checked before anything loads (the device,
    ``--reference base``, stdin under several processes), then :func:`launched`."""
    devices.check_device_spec(job.device)
    comparison.adapter_of(job.model, job.reference)
    parallel.check_shareable(files or ([] if inputs.stdin_is_terminal() else [inputs.STDIN]))
    with launched(job.device) as rank_device:
        yield rank_device


def identity(command: str, job: ScoringJob, files: list[str] | None,
             **options: Any) -> JobIdentity:
    """What defines a perplexity or score job for ``--resume``: its input files (their names
    too: they key perplexity's records, and choose how score reads a file), its model, and
    every option that changes its records: the command's own ``options``, the device, the dtype
    and the reference, when there is one (the batch size changes none)."""
    options.update(device=job.device, dtype=job.dtype.value)
    if job.reference is not None:
        options["reference"] = model_key(job.reference)
    return JobIdentity(command, job.model, options, files=tuple(files or [inputs.STDIN]),
                       named=True)


def processes() -> str:
    """``, 2 processes`` for a summary line under a launcher; nothing otherwise."""
    world = distributed.world_size()
    return f", {world} processes" if world > 1 else ""


class JobProgress(console.ProgressBar):
    """done / total, a rate (tokens/s) and the time left; on rank 0's terminal only."""

    def __init__(self, label: str, total: int | None, *, done: int = 0, unit: str = "tokens",
                 enabled: bool = True) -> None:
        super().__init__(label, TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
        self.enabled = enabled and distributed.is_main_process() and console.progress_enabled()
        self.total = total
        self.done = done
        self.unit = unit
        self.amount = 0  # tokens (or other units) since the first result
        self.started: float | None = None  # the first result: the model is loaded by then

    def advance(self, items: int = 1, amount: int = 0) -> None:
        self.done += items
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.started is None:
            self.started = now
        else:
            self.amount += amount
        elapsed = now - self.started
        rate = f"{self.amount / elapsed:,.1f} {self.unit}/s" if elapsed > 0 else ""
        self.update(self.done, self.total, rate=rate)  # type: ignore[arg-type]

    def update(self, done: int, total: Any, **fields: Any) -> None:
        if self.enabled:
            super().update(done, total, **fields)
