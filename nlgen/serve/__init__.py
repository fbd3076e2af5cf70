"""``nlgen serve``: a loaded model behind the OpenAI HTTP API.

Owns the server's options (``options``), what an HTTP request asks and how it is answered in
OpenAI's shapes, server-sent events included (``protocol``), the bridge between the engine's
thread and the event loop (``relay``: a ticket's events as an async stream, its cancellation
when the client goes), the routes with their checks (``app``: FastAPI; authentication, body
size, errors as OpenAI error bodies, /health, /metrics) and the process's life (``server``:
the socket, uvicorn, the model loading in the background, draining or cancelling at the end).
The generation itself is the engine's (``nlgen.engine.continuous``: continuous batching).

May import: jobs (an OpenAI body's parsing and answer), engine, models, and errors, inputs.
Not finetune or cli. fastapi, uvicorn and prometheus_client are imported inside functions, so
that ``nlgen --help`` does not pay for them.
"""
