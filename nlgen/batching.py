"""Input read ahead in groups: what every batched command does before it batches.

- :func:`read_windows`: prompts from a producer that may trickle (``producer | nlgen
  generate``), grouped without waiting: a fast producer fills whole batches, a slow one gets
  each prompt answered as it comes;
- :func:`read_ahead`: consecutive groups of items, each closed as soon as it is full enough to
  batch well.

Below the engine and the scorers, which both batch what these read. Core module: standard
library only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from nlgen.errors import NlgenError

T = TypeVar("T")

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
