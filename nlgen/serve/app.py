"""The routes of ``nlgen serve`` and what every request passes through.

``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``
(503 while the model loads or the server stops, 200 when it answers) and ``GET /metrics``
(Prometheus). Every route but /health asks for the API key when the server has one. Every
refusal, the framework's own included (404, 405, a validation error), is OpenAI's error body
with its status, and the server goes on. The handlers only submit and relay: generation is the
engine's, on its own thread.

Core module: no typer, no rich, no printing (a line per request goes to the ``nlgen`` logger).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nlgen.engine.options import GenerationOptions
from nlgen.jobs import batchjob
from nlgen.jobs.batchjob import CHAT_URL, COMPLETIONS_URL
from nlgen.serve import protocol
from nlgen.serve.options import ServeOptions
from nlgen.serve.protocol import ApiError, Call
from nlgen.serve.relay import Relay

log = logging.getLogger("nlgen")

USAGE = "nlgen.usage"  # a request's scope key: the usage of its answer, for the log and metrics
ROUTES = ("/health", "/metrics", "/v1/models", COMPLETIONS_URL, CHAT_URL)
CLIENT_GONE = 499  # the status logged for a client that left before its answer (nginx's)


@dataclass
class State:
    """What the routes share: the options, and the engine once the model is loaded."""

    options: ServeOptions
    # Options every request starts from: a prompt too long for the context is refused (400),
    # not cut from the left as a batch job's is.
    base: GenerationOptions = field(default_factory=lambda: GenerationOptions(truncate=False))
    engine: Any = None  # nlgen.engine.continuous.Engine, once the model is loaded
    name: str = ""  # the served model's name
    context: int = 0  # the model's context, in tokens
    stopping: bool = False
    started: int = field(default_factory=lambda: int(time.time()))
    relays: set[Relay] = field(default_factory=set)  # requests in flight

    def ready(self) -> Any:
        """The engine, or a 503 while the model loads or the server stops."""
        if self.stopping:
            raise ApiError(503, "the server is stopping", code="shutting_down")
        if self.engine is None:
            raise ApiError(503, "the model is still loading; GET /health says when it is "
                           "ready", code="model_loading")
        return self.engine

    def stop_relays(self) -> None:
        """Tell every request in flight that the server stops (its ticket is cancelled)."""
        for relay in list(self.relays):
            relay.stop()


def create_app(state: State) -> Any:
    """The ASGI application (FastAPI) serving ``state``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    app = FastAPI(title="nlgen", openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(ApiError(400, str(first.get("msg", "invalid request")),
                                     param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return JSONResponse(ApiError(exc.status_code, message).body(),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> Response:
        log.error("%s %s: unexpected %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc)
        return JSONResponse(ApiError(500, f"internal error ({type(exc).__name__})").body(),
                            status_code=500)

    # Plain routes (the handler takes the request itself): the body is read and checked by
    # protocol.parse_call, the same rules as a batch file's, not by a pydantic model.
    async def health(request: Request) -> Response:
        status = ("stopping" if state.stopping else "loading" if state.engine is None
                  else "ok")
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    async def models(request: Request) -> Response:
        state.ready()
        return JSONResponse({"object": "list", "data": [
            {"id": state.name, "object": "model", "created": state.started,
             "owned_by": "nlgen"}]})

    async def completions(request: Request) -> Response:
        return await _answer(state, request, COMPLETIONS_URL)

    async def chat_completions(request: Request) -> Response:
        return await _answer(state, request, CHAT_URL)

    metrics = Metrics()

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(state), media_type=metrics.media_type)

    for path, handler, method in (("/health", health, "GET"), ("/v1/models", models, "GET"),
                                  (COMPLETIONS_URL, completions, "POST"),
                                  (CHAT_URL, chat_completions, "POST"),
                                  ("/metrics", prometheus, "GET")):
        app.add_route(path, handler, methods=[method])
    return Guarded(app, state, metrics)


async def _answer(state: State, request: Any, url: str) -> Any:
    """Read, check and submit a completion request; its answer, whole or streamed."""
    from fastapi.responses import JSONResponse, Response

    engine = state.ready()
    body = _decode(await _read_body(request, state.options.max_body))
    call = protocol.parse_call(body, url, state.base, context=state.context,
                               max_n=state.options.max_n)
    relay = Relay(asyncio.get_running_loop())
    relay.submit(engine, call)
    state.relays.add(relay)
    if call.stream:
        return EventStream(_stream(state, relay, call, request.scope))
    try:
        generations = await _until_gone(request.receive,
                                        relay.generations(call.options.num_return_sequences))
    finally:
        relay.cancel()
        state.relays.discard(relay)
    if generations is None:
        return Response(status_code=CLIENT_GONE)
    request.scope[USAGE] = batchjob.usage(generations)
    return JSONResponse(protocol.response(call, generations, state.name))


async def _stream(state: State, relay: Relay, call: Call,
                  scope: dict[str, Any]) -> AsyncIterator[bytes]:
    """A streamed answer's events: text as it comes, each sequence's end, the usage, [DONE].

    Closed early (the client went), it cancels the ticket in its ``finally``."""
    from nlgen.engine.continuous import Finished

    chunks = protocol.Chunks(call, state.name)
    done = []
    logprobs = call.options.logprobs is not None
    try:
        for chunk in chunks.opening():
            yield chunk
        async for event in relay.events(call.options.num_return_sequences):
            if isinstance(event, Finished):
                done.append(event.generation)
                yield chunks.finished(event.generation)
            elif event.text or (logprobs and event.logprobs):
                yield chunks.text(event.sequence, event.text, event.logprobs)
        scope[USAGE] = batchjob.usage(done)
        if call.include_usage:
            yield chunks.usage(done)
    except ApiError as exc:
        yield protocol.error_event(exc)
    finally:
        relay.cancel()
        state.relays.discard(relay)
    yield protocol.DONE


# A body over the limit by at most this much is read to its end (and dropped) before the 413:
# a client is still sending it, and a server that closes a connection with unread bytes in it
# resets it, so the client would see "connection reset" instead of the answer (what RFC 9112
# section 9.6 calls a lingering close). Beyond it the server answers at once and closes.
DRAIN_BYTES = 16 << 20


async def _read_body(request: Any, limit: int) -> bytes:
    """The request's body, refused (413) beyond ``limit`` bytes; no more than ``limit`` bytes
    are ever kept."""
    too_big = ApiError(413, f"the body exceeds this server's {limit:,} bytes (--max-body)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + DRAIN_BYTES:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit + DRAIN_BYTES:
            raise too_big
        if size <= limit:
            parts.append(part)
    if size > limit:
        raise too_big
    return b"".join(parts)


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not UTF-8 (byte at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not JSON ({exc.msg}, line {exc.lineno} column "
                       f"{exc.colno})") from None


async def _watch(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Return when the client disconnects (the body is read: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_gone(receive: Callable[[], Awaitable[dict[str, Any]]],
                      work: Awaitable[Any]) -> Any:
    """``work``'s result, or None when the client disconnects first (``work`` is cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_watch(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # its own finally runs (the ticket is cancelled) before we go on
            await asyncio.wait({task})
    if task.cancelled():
        return None
    return task.result()


class EventStream:
    """A ``text/event-stream`` response that stops (and closes its source, which cancels the
    ticket) as soon as the client disconnects, even while no event is due."""

    headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self.events = events

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _until_gone(receive, pump())
        except OSError:  # the client went while an event was being sent
            pass
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]


class Metrics:
    """Prometheus counters of one server (a registry of its own: no process-wide state)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        self.media_type = CONTENT_TYPE_LATEST
        self.registry = CollectorRegistry()
        self.requests = Counter("nlgen_requests", "HTTP requests answered",
                                ["route", "status"], registry=self.registry)
        self.seconds = Histogram("nlgen_request_seconds", "Time to the end of the answer",
                                 ["route"], registry=self.registry)
        self.tokens = Counter("nlgen_tokens", "Tokens read (prompt) and generated "
                              "(completion)", ["kind"], registry=self.registry)
        self.in_flight = Gauge("nlgen_requests_in_flight", "Completion requests being "
                               "answered", registry=self.registry)
        self.ready = Gauge("nlgen_ready", "1 when the model answers", registry=self.registry)

    def render(self, state: State) -> bytes:
        from prometheus_client import generate_latest

        self.ready.set(state.engine is not None and not state.stopping)
        self.in_flight.set(len(state.relays))
        return generate_latest(self.registry)

    def count(self, route: str, status: int, seconds: float, usage: dict | None) -> None:
        self.requests.labels(route, str(status)).inc()
        self.seconds.labels(route).observe(seconds)
        if usage:
            self.tokens.labels("prompt").inc(usage["prompt_tokens"])
            self.tokens.labels("completion").inc(usage["completion_tokens"])


class Guarded:
    """The app behind what every request passes first: the API key (every route but
    /health), then a line per request to the ``nlgen`` logger (shown under -v) and the
    metrics."""

    def __init__(self, app: Any, state: State, metrics: Metrics) -> None:
        self.app = app
        self.state = state
        self.metrics = metrics
        key = state.options.api_key
        self.key = key.encode("utf-8") if key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key is not None and scope["path"] != "/health" and not self._allowed(scope):
                await _refuse(sending, ApiError(401, "invalid or missing API key: send "
                                                "'Authorization: Bearer KEY'",
                                                code="invalid_api_key"))
            else:
                await self.app(scope, receive, sending)
        finally:
            self._record(scope, status[0], time.perf_counter() - started)

    def _allowed(self, scope: dict[str, Any]) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        # compare_digest: how long the comparison takes says nothing about the key.
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key)

    def _record(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        path = scope["path"]
        usage = scope.get(USAGE)
        self.metrics.count(path if path in ROUTES else "other", status, seconds, usage)
        tokens = (f" ({usage['prompt_tokens']} + {usage['completion_tokens']} tokens)"
                  if usage else "")
        log.info("%s %s %d %.2f s%s", scope["method"], path, status, seconds, tokens)


async def _refuse(send: Any, error: ApiError) -> None:
    body = json.dumps(error.body()).encode("utf-8")
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
