"""What ``nlgen serve`` is asked to do: one frozen dataclass, checked when it is made.

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nlgen.errors import UsageError

DEFAULT_HOST = "127.0.0.1"  # this machine only: another must be asked for (--host 0.0.0.0)
DEFAULT_PORT = 8000
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's own bound)


@dataclass(frozen=True)
class ServeOptions:
    """The server's address, its key, and the bounds that keep one client from taking it all."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1 and /metrics
    served_name: str | None = None  # the model's name in answers; None: the loaded model's
    slots: int = 8  # sequences decoded together (the engine's batch)
    max_queue: int = 64  # requests waiting for a slot; beyond it: 503 at once
    max_n: int = 16  # sequences one request may ask for (n)
    max_body: int = 1 << 20  # bytes of a request body; beyond it: 413
    drain_timeout: float = 30.0  # seconds SIGTERM waits for requests in flight

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key is empty", hint="give a key, or leave NLGEN_API_KEY "
                             "unset to serve without one")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in [0, 65535] (got {self.port})")
        for name in ("slots", "max_n", "max_body"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1 "
                                 f"(got {getattr(self, name)})")
        if self.max_queue < 0:
            raise UsageError(f"--max-queue must be 0 or more (got {self.max_queue})")
        if not 0 <= self.drain_timeout < math.inf:
            raise UsageError(f"--drain-timeout must be 0 or more, and finite "
                             f"(got {self.drain_timeout})")
        if self.served_name is not None and not self.served_name.strip():
            raise UsageError("--served-model-name is empty")

    @property
    def local_only(self) -> bool:
        """Bound to the loopback interface: only this machine can reach the server."""
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
