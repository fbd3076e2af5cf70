"""The bridge between the engine's thread and the event loop: one request's ticket.

The engine calls ``on_event`` from its own thread; a :class:`Relay` hands each event to the
event loop (``call_soon_threadsafe``) and the request's handler reads them as an async stream.
Whatever way the handler ends (the answer sent, the client gone, the server stopping), the
ticket is cancelled, so a slot is never held for a reader that is not there.

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from nlgen.engine.generation import Generation
from nlgen.errors import InputError, NlgenError, UsageError
from nlgen.serve.protocol import ApiError, Call, engine_error


class Stopped:
    """The server's own last event for a relay whose ticket it cancelled (Ctrl-C): the engine
    may send nothing more, so the handler is told here."""

    error = "the server is stopping"


class Relay:
    """One request's ticket on the engine, and its events on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.ticket: Any = None
        self.done = False  # every sequence finished, or the ticket failed

    def _on_event(self, event: Any) -> None:  # the engine's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    def submit(self, engine: Any, call: Call) -> None:
        """Put the request on the engine: 503 at once when its queue is full, 400 when the
        engine refuses the request itself."""
        from nlgen.engine.continuous import Busy

        try:
            self.ticket = engine.submit(call.prompt, call.options, self._on_event)
        except Busy as exc:
            raise ApiError(503, f"the server is busy: {exc.message}", code="overloaded",
                           kind="server_error") from None
        except (UsageError, InputError) as exc:
            raise engine_error(exc.message, call) from None
        except NlgenError as exc:  # the engine closed (stopping), or another refusal
            raise ApiError(503, exc.message, kind="server_error") from None

    def stop(self) -> None:
        """End the handler's stream from the loop's side (the server is stopping)."""
        self._on_event(Stopped())

    def cancel(self) -> None:
        """Free the ticket's slots (the client is gone, or the answer is complete)."""
        if self.ticket is not None and not self.done:
            self.ticket.cancel()
        self.done = True

    async def events(self, sequences: int) -> AsyncIterator[Any]:
        """The ticket's Delta and Finished events, until every sequence is finished; a Failed
        ticket raises an ApiError (500, or 503 while the server stops)."""
        from nlgen.engine.continuous import Failed, Finished

        finished = 0
        while finished < sequences:
            event = await self.queue.get()
            if isinstance(event, Stopped):
                self.cancel()
                raise ApiError(503, event.error, code="shutting_down")
            if isinstance(event, Failed):
                self.done = True
                raise ApiError(500, f"generation failed: {event.error}")
            if isinstance(event, Finished):
                finished += 1
                self.done = finished == sequences
            yield event

    async def generations(self, sequences: int) -> list[Generation]:
        """Every sequence's final record, in sequence order (the answer not streamed)."""
        from nlgen.engine.continuous import Finished

        found = [e.generation async for e in self.events(sequences) if isinstance(e, Finished)]
        return sorted(found, key=lambda g: g.sequence)
