"""JSON lines out: one record a line, numbers JSON can carry.

JSON has no NaN or infinity (Python's ``json`` writes ``NaN`` and ``Infinity``, which ``jq`` and
most parsers refuse). A figure that is not finite (the log-prob of a token the model rules out,
the perplexity of a text whose loss overflows) is written as ``null``. Every JSONL writer of
nlgen (stdout records, ``--output`` job files) goes through :func:`dumps`.

Core module: standard library only.
"""

from __future__ import annotations

import json
import math
from typing import Any


def json_float(x: float) -> float | None:
    """``x``, or None where JSON cannot carry it (NaN, +-infinity)."""
    return x if math.isfinite(x) else None


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return json_float(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(record: Any) -> str:
    """``record`` as one line of JSON (no newline), UTF-8 text as is, non-finite floats null."""
    return json.dumps(_finite(record), ensure_ascii=False, allow_nan=False)
