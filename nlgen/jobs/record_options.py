"""A request record's own options over the job's: nlgen prompt records and OpenAI bodies.

A record may set any of :data:`OPTION_FIELDS` (OpenAI's names first, then nlgen's own); an
OpenAI request body may also ask for log-probabilities, as each endpoint asks for them:
``/v1/completions`` with ``"logprobs": K`` (an integer, the alternatives per token),
``/v1/chat/completions`` with ``"logprobs": true`` and ``"top_logprobs": K``. Whatever else a
record holds is refused by name, so that nothing asked for is silently dropped.

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nlgen.engine.extra_options import kebab
from nlgen.engine.options import GenerationOptions
from nlgen.errors import UsageError

# A record's option -> GenerationOptions field. OpenAI's names first, then nlgen's own.
OPTION_FIELDS = {
    "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
    "max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
    "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "n": "num_return_sequences", "num_return_sequences": "num_return_sequences",
    "stop": "stop", "seed": "seed",
}
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_new_tokens")
INTEGER_OPTIONS = {"max_new_tokens", "top_k", "num_return_sequences", "seed"}
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "typical_p")
COMPLETIONS, CHAT = "completions", "chat"  # how an OpenAI body asks for log-probs


class FieldError(ValueError):
    """A record's bad field: the message (which names it), and the field's own name (``param``,
    without the ``body.`` prefix) for an OpenAI error body, or None when no one field is at
    fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def overlay(record: dict[str, Any], base: GenerationOptions, where: str,
            logprobs: str | None = None) -> GenerationOptions:
    """The job's options ``base`` overlaid with the record's (what is left in ``record``).

    ``logprobs``: COMPLETIONS or CHAT for an OpenAI body, whose ``logprobs`` (and
    ``top_logprobs``) then replace ``--logprobs`` for this request; None for nlgen records,
    which have no such field. Raises FieldError (a ValueError) naming the field.
    """
    record = dict(record)
    changes: dict[str, Any] = {}
    if logprobs is not None:
        changes.update(_logprobs(record, base, where, chat=logprobs == CHAT))
    for key, value in record.items():
        field = OPTION_FIELDS.get(key)
        if field is None:
            raise FieldError(f"unknown option {where}{key} (known: "
                             f"{', '.join(sorted(OPTION_FIELDS))})", key)
        changes[field] = _check_type(field, value, f"{where}{key}", key)
    if changes.get("temperature") == 0:  # OpenAI's temperature 0: greedy decoding
        changes.pop("temperature")
        changes.update({name: None for name in SAMPLING}, greedy=True)
    elif any(name in changes for name in SAMPLING):
        changes["greedy"] = False
    if "max_new_tokens" in changes:
        changes["max_length"] = None
    if changes.get("top_k") == -1:  # vLLM's "every token"
        changes["top_k"] = 0
    try:
        return dataclasses.replace(base, **changes)
    except UsageError as exc:
        raise FieldError(exc.message, _named(exc.message, record)) from None


def _named(message: str, record: dict[str, Any]) -> str | None:
    """The record's field that a GenerationOptions message names by its option (``--top-p``)."""
    return next((key for key, field in OPTION_FIELDS.items()
                 if key in record and message.startswith(f"--{kebab(field)} ")), None)


def length_field(record: dict[str, Any], where: str) -> str | None:
    """The field by which a record sets its own number of new tokens (``body.max_tokens``)."""
    return next((f"{where}{name}" for name in LENGTH_FIELDS if name in record), None)


def _logprobs(record: dict[str, Any], base: GenerationOptions, where: str, *,
              chat: bool) -> dict[str, Any]:
    """Pop an OpenAI body's log-prob fields: ``{"logprobs": K or None}``, or nothing."""
    asked = record.pop("logprobs", ...)
    top = record.pop("top_logprobs", None)
    if top is not None and (not chat or isinstance(top, bool) or not isinstance(top, int)
                            or top < 0):
        raise FieldError(f"{where}top_logprobs is not an integer of 0 or more" if chat else
                         f"unknown option {where}top_logprobs (a completion's logprobs is the "
                         "number of alternatives)", "top_logprobs")
    if chat:
        if asked is not ... and asked is not None and not isinstance(asked, bool):
            raise FieldError(f"{where}logprobs is not true or false", "logprobs")
        if top is not None and not (asked is True or (asked is ... and base.logprobs is not None)):
            raise FieldError(f"{where}top_logprobs needs {where}logprobs: true", "top_logprobs")
        if asked is ... and top is None:
            return {}
        return {"logprobs": (top or 0) if asked is True or top is not None else None}
    if asked is ...:
        return {}
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 0):
        raise FieldError(f"{where}logprobs is not an integer of 0 or more", "logprobs")
    return {"logprobs": asked}


def _check_type(field: str, value: Any, name: str, key: str) -> Any:
    if field == "stop":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise FieldError(f"{name} is not a string or a list of strings", key)
        return tuple(stops)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(f"{name} is not a number", key)
    if field in INTEGER_OPTIONS:
        if value != int(value):
            raise FieldError(f"{name} is not an integer", key)
        return int(value)
    return float(value)
