"""Input read ahead in groups: what every batched command does before it batches.

- :func:`read_windows`: prompts from a producer that may trickle (``producer | nlgen
  generate``), grouped without waiting: a fast producer fills whole batches, a slow one gets
  each prompt answered as it comes;
- :func:`read_ahead`: consecutive groups of items, each closed as soon as it is full enough to
  batch well;
- :func:`sorted_batches`: a group sorted by length and cut into batches, so that a batch pads
  little;
- :func:`run_in_order`: those batches run, each result handed on in input order as soon as it
  and every one before it are done.

Below the engine and the scorers, which both batch what these read. Core module: standard
library only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from nlgen.errors import NlgenError

T = TypeVar("T")
R = TypeVar("R")

WINDOW_BATCHES = 8  # items read ahead = batch_size * this, sorted by length inside the window
_END = object()


def read_windows(source: Iterator[T], batch_size: int,
             ) -> Iterator[tuple[list[T], NlgenError | None]]:
    """Group prompts into windows without waiting on a slow producer.

    A reader thread pulls prompts (perhaps from a pipe that trickles) into a queue. Each window
    takes the first prompt waiting, then whatever else has already arrived, up to
    ``batch_size * WINDOW_BATCHES``: a fast producer fills whole batches, a slow one (a person
    typing, a script emitting now and then) gets each prompt answered as it comes. A read error
    (a non-UTF-8 line) ends the input after the good prompts before it are done.
    """
    items: queue.Queue = queue.Queue()

    def reader() -> None:
        try:
            for item in source:
                items.put(item)
            items.put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it in its thread
            items.put(exc)

    threading.Thread(target=reader, daemon=True, name="nlgen-prompts").start()
    limit = batch_size * WINDOW_BATCHES
    while True:
        window: list[T] = []
        item = items.get()
        while True:
            if item is _END or isinstance(item, BaseException):
                failure = item if isinstance(item, NlgenError) else None
                if isinstance(item, BaseException) and failure is None:
                    raise item
                yield window, failure
                return
            window.append(item)
            if len(window) >= limit:
                break
            try:  # more already waiting, or about to be (a fast producer): take it along
                item = items.get(timeout=0.02 if len(window) < batch_size else 0)
            except queue.Empty:
                break
        yield window, None


def read_ahead(items: Iterable[T], full: Callable[[list[T]], bool]) -> Iterator[list[T]]:
    """Consecutive groups of `items`, each closed as soon as ``full(group)`` holds.

    The scorers read their input a group at a time: enough to batch well (sorted by length),
    little enough that results come out while later input is still being read.
    """
    group: list[T] = []
    for item in items:
        group.append(item)
        if full(group):
            yield group
            group = []
    if group:
        yield group


def sorted_batches(items: Iterable[T], size: int, key: Callable[[T], Any], *,
                   reverse: bool = False, shard: tuple[int, int] = (0, 1)) -> list[list[T]]:
    """`items` sorted by `key`, in batches of `size`.

    Similar lengths share a batch, so little is spent on padding. The sort is stable (equal keys
    keep their input order, ``reverse`` too), so the batches, and their float rounding, are the
    same from run to run. ``shard=(rank, ranks)`` keeps every ranks-th item of the sorted order
    from rank: each rank gets a mix of every length.
    """
    rank, ranks = shard
    order = sorted(items, key=key, reverse=reverse)[rank::ranks]
    return [order[start:start + size] for start in range(0, len(order), size)]


def run_in_order(items: Sequence[T], size: int, key: Callable[[T], Any],
                 run: Callable[[list[T]], Sequence[R]], *,
                 reverse: bool = False) -> Iterator[tuple[T, R]]:
    """Run `items` in :func:`sorted_batches`; yield ``(item, result)`` in input order.

    ``run(batch)`` gives a result per item of the batch. Each result is yielded as soon as it
    and every result before it (in input order) are in: a consumer sees the first ones while
    later batches still run.
    """
    done: dict[int, R] = {}
    at = 0
    for batch in sorted_batches(range(len(items)), size, lambda i: key(items[i]),
                                reverse=reverse):
        for i, result in zip(batch, run([items[i] for i in batch]), strict=True):
            done[i] = result
        while at in done:
            yield items[at], done.pop(at)
            at += 1
