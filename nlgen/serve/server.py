"""The life of an ``nlgen serve`` process: listen, load, answer, stop.

The socket is bound first (a port in use is an error before anything loads), uvicorn starts
answering at once (/health says 503 while loading), and the model loads on a thread of its
own, then the engine starts. :meth:`Server.stop` is how the process's owner (the CLI, on
SIGTERM or Ctrl-C) ends it: no new connections; requests in flight are drained (SIGTERM: up
to ``drain_timeout`` seconds, then cancelled) or cancelled at once (Ctrl-C); then the engine
is closed and :meth:`Server.run` returns.

Core module: no typer, no rich, no printing, no signal handlers (the CLI owns those).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from nlgen.errors import NlgenError, first_line
from nlgen.models.loading import LoadedModel
from nlgen.serve.app import State, create_app
from nlgen.serve.options import ServeOptions

log = logging.getLogger("nlgen")


class Server:
    """One server: ``load`` gives the model (called on a thread of its own), ``on_ready`` is
    told when it answers."""

    def __init__(self, options: ServeOptions, load: Callable[[], LoadedModel],
                 on_ready: Callable[[LoadedModel], None] | None = None) -> None:
        self.options = options
        self.load = load
        self.on_ready = on_ready
        self.state = State(options)
        self.failure: BaseException | None = None  # why the model did not load
        self.interrupted = False  # stopped by Ctrl-C: in-flight requests cancelled
        self._uvicorn: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # the engine is started, or the server stops: not both
        self._canceller: threading.Thread | None = None  # Ctrl-C's engine.close(drain=False)
        self.socket = self._bind()

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def _bind(self) -> socket.socket:
        """The listening socket, bound now: a bad address or a port in use is an error here."""
        host, port = self.options.host, self.options.port
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise NlgenError(f"cannot listen on {host}:{port}: {first_line(exc)}",
                             hint="give --host an address of this machine") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(2048)
        except OSError as exc:
            sock.close()
            raise NlgenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                             hint="another --port, or stop the process that holds it") from None
        sock.setblocking(False)
        return sock

    def run(self) -> None:
        """Serve until :meth:`stop`; raise the loading error when the model did not load."""
        import uvicorn

        config = uvicorn.Config(create_app(self.state), log_config=None, access_log=False,
                                lifespan="off", server_header=False,
                                timeout_graceful_shutdown=max(self.options.drain_timeout, 0.1))
        self._uvicorn = _uvicorn_server(config)
        try:
            asyncio.run(self._serve())
        finally:
            self.socket.close()
            if self._canceller is not None:
                self._canceller.join()
            self._close_engine()
        if self.failure is not None:
            raise self.failure

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._load, name="nlgen-load", daemon=True).start()
        await self._uvicorn.serve(sockets=[self.socket])

    def _load(self) -> None:
        """The loading thread: the model, then the engine; a failure stops the server."""
        from nlgen.engine.continuous import Engine

        try:
            lm = self.load()
            with self._lock:
                if self.state.stopping:
                    return
                engine = Engine(lm, slots=self.options.slots, max_queue=self.options.max_queue)
                self.state.name = self.options.served_name or lm.name
                self.state.context = engine.context
                self.state.engine = engine
        except Exception as exc:  # raised again by run(), in the main thread
            self.failure = exc
            self._call(self._shut_down)
            return
        if self.on_ready is not None:
            self.on_ready(lm)

    def stop(self, interrupted: bool = False) -> None:
        """End the server (called from a signal handler: quick, no locks held long).

        ``interrupted`` (Ctrl-C): requests in flight are cancelled at once; else (SIGTERM)
        they are drained. Asked twice, the server stops without waiting for anyone."""
        if self._uvicorn is None:
            return
        if self._uvicorn.should_exit:
            self._uvicorn.force_exit = True
        self.interrupted = self.interrupted or interrupted
        self.state.stopping = True
        self._uvicorn.should_exit = True
        if interrupted and self._canceller is None:
            self._call(self.state.stop_relays)
            # engine.close joins its thread: not in a signal handler.
            self._canceller = threading.Thread(target=self._close_engine, name="nlgen-cancel",
                                               daemon=True)
            self._canceller.start()

    def _shut_down(self) -> None:
        self.state.stopping = True
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    def _call(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the event loop's thread."""
        with contextlib.suppress(RuntimeError, AttributeError):  # the loop is gone already
            self._loop.call_soon_threadsafe(function)  # type: ignore[union-attr]

    def _close_engine(self) -> None:
        """Stop the engine: drain what is left (SIGTERM: uvicorn has waited for the requests
        already) or cancel it (Ctrl-C), and join its thread."""
        with self._lock:
            self.state.stopping = True
            engine, self.state.engine = self.state.engine, None
        if engine is not None:
            engine.close(drain=not self.interrupted, timeout=self.options.drain_timeout)


def _uvicorn_server(config: Any) -> Any:
    """uvicorn's server without its signal handlers: the process's owner calls Server.stop."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)
