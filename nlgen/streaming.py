"""Text in and out as it comes: prompt windows from a slow producer, streamed text, stop strings.

Prompts are read by a thread, so that ``producer | nlgen generate`` answers each prompt of a
trickling producer at once while a fast one fills whole batches; generated text is handed out
piece by piece, never past a stop string and never half a UTF-8 character.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

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



def cut_at_stop(text: str, stops: Iterable[str]) -> str | None:
    """The text before the earliest stop string, or None when no stop string occurs."""
    positions = [p for p in (text.find(s) for s in stops) if p >= 0]
    return text[: min(positions)] if positions else None


class StopAwareStreamer:
    """A transformers streamer that hands out decoded text as it grows, never past a stop string.

    It decodes the whole completion at each step (cheap next to a forward pass) and holds back
    text that may still change: an incomplete UTF-8 character, or a tail that could be the start
    of a stop string.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], emit: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.emit = emit
        self.ids: list[int] = []
        self.sent = ""  # the text already emitted
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt itself
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = cut_at_stop(text, self.stops) if self.stops else None
        if cut is not None:
            self._send(cut)
            self.stopped = True
            return
        # Trailing U+FFFD: bytes of a character not complete yet; they may still change.
        stable = len(text.rstrip("\ufffd"))
        safe = stable - self.hold  # a stop string may still begin in the last `hold` chars
        if safe > len(self.sent):
            self._send(text[:safe])

    def end(self) -> None:
        pass  # the final text is sent by finish(), which knows the exact cut

    def finish(self, completion: str) -> None:
        self._send(completion)

    def _send(self, text: str) -> None:
        # Text once printed cannot be taken back: only ever extend what was sent.
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.emit(text[len(self.sent):])
            self.sent = text


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
