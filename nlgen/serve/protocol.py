"""What an HTTP request asks, and how it is answered: OpenAI's request and response shapes.

A request body becomes a :class:`Call` (the prompt and options the engine runs, and how to
answer) through the batch job's own parser (nlgen.jobs.batchjob.parse_body), so that a field
means the same in a batch file and over HTTP and a field nlgen does not take is refused by
name. The server adds what only a server has: ``stream`` and ``stream_options``, its bounds
(``n``, log-probs, ``max_tokens`` against the context), and ``null`` read as "not given", as
OpenAI's own clients send it. A refusal is an :class:`ApiError`: a status and OpenAI's error
body.

Streamed answers are server-sent events: one ``data: {chunk}`` event per piece of text, a
closing chunk per sequence with its ``finish_reason``, the usage chunk when
``stream_options.include_usage`` asks for it (its ``choices`` empty), then ``data: [DONE]``.

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from nlgen.engine.extra_options import kebab
from nlgen.engine.generation import Generation
from nlgen.engine.options import GenerationOptions
from nlgen.inputs import Prompt
from nlgen.jobs import batchjob, record_options
from nlgen.jobs.batchjob import CHAT_URL, COMPLETIONS_URL
from nlgen.score.likelihood import TokenLogprob
from nlgen.serve.options import MAX_LOGPROBS

DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """A request answered with an error: its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.code = code

    def body(self) -> dict[str, Any]:
        return batchjob.error_body(self.message, self.param, self.kind, self.code)


@dataclass(frozen=True)
class Call:
    """One request to /v1/completions or /v1/chat/completions, as the engine runs it."""

    url: str
    prompt: Prompt
    options: GenerationOptions
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a closing usage chunk
    length_field: str | None = None  # max_tokens or max_completion_tokens, when given
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chat(self) -> bool:
        return self.url == CHAT_URL

    @property
    def response_id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.id}"


def parse_call(body: Any, url: str, base: GenerationOptions, *, context: int,
               max_n: int) -> Call:
    """The Call a decoded JSON body asks for; an ApiError (400) naming the field otherwise.

    ``context``: the model's context in tokens (``max_tokens`` must leave room for a prompt);
    ``max_n``: the most sequences a request may ask for.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the body is not a JSON object")
    body = {key: value for key, value in body.items() if value is not None}
    stream = body.pop("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream is not true or false", "stream")
    include_usage = _stream_options(body.pop("stream_options", None), stream)
    if not isinstance(body.get("model", ""), str):
        raise ApiError(400, "model is not a string", "model")
    try:
        parsed = batchjob.parse_body(body, url, base)
    except record_options.FieldError as exc:
        raise ApiError(400, _own_words(str(exc), exc.param), exc.param) from None
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    opts = parsed.options
    if opts.num_return_sequences > max_n:
        raise ApiError(400, f"n is {opts.num_return_sequences}; this server gives at most "
                       f"{max_n} sequences a request (--max-n)", "n")
    if opts.logprobs is not None and opts.logprobs > MAX_LOGPROBS:
        param = "top_logprobs" if url == CHAT_URL else "logprobs"
        raise ApiError(400, f"{param} is {opts.logprobs}; at most {MAX_LOGPROBS} alternatives "
                       "a token", param)
    if opts.max_new_tokens is not None and opts.max_new_tokens >= context:
        param = parsed.length_field or "max_tokens"
        raise ApiError(400, f"{param} {opts.max_new_tokens} leaves no room for a prompt in the "
                       f"model's {context}-token context", param)
    return Call(url, parsed.prompt, opts, stream, include_usage, parsed.length_field)


def _stream_options(value: Any, stream: bool) -> bool:
    """``stream_options.include_usage``; the object is refused without ``stream: true``."""
    if value is None:
        return False
    if not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true",
                       "stream_options")
    if not isinstance(value, dict):
        raise ApiError(400, "stream_options is not an object", "stream_options")
    unknown = sorted(set(value) - {"include_usage"})
    if unknown:
        raise ApiError(400, f"unknown option stream_options.{unknown[0]} (known: "
                       "include_usage)", "stream_options")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise ApiError(400, "stream_options.include_usage is not true or false",
                       "stream_options")
    return include


def _own_words(message: str, param: str | None) -> str:
    """A message that names an option as the command line does (``--top-p must be ...``)
    names the request's field instead (``top_p must be ...``)."""
    field_name = record_options.OPTION_FIELDS.get(param or "")
    prefix = f"--{kebab(field_name)} " if field_name else None
    if prefix and message.startswith(prefix):
        return f"{param} {message[len(prefix):]}"
    return message


def engine_error(message: str, call: Call) -> ApiError:
    """A request the engine refused (a prompt too long for the context, empty after
    tokenization): 400, naming the field at fault where the message says which."""
    said = ("--max-new-tokens", "new tokens")
    if call.length_field and any(words in message for words in said):
        return ApiError(400, message, call.length_field)
    return ApiError(400, message, "messages" if call.chat else "prompt")


# ----------------------------------------------------------------------------- answers


def response(call: Call, generations: list[Generation], model: str) -> dict[str, Any]:
    """The whole answer (not streamed): a completion or chat completion object."""
    return batchjob.response_body(call.url, generations, model, call.response_id,
                                  call.created)


def event(payload: dict[str, Any]) -> bytes:
    """One server-sent event: ``data: {json}`` and a blank line (non-finite floats as null:
    the log-probs are already JSON-safe, see token_logprobs.openai_content)."""
    return b"data: " + json.dumps(payload, ensure_ascii=False,
                                 separators=(",", ":")).encode("utf-8") + b"\n\n"


class Chunks:
    """The chunks of one streamed answer, in OpenAI's shapes (``chat.completion.chunk`` or
    ``text_completion``)."""

    def __init__(self, call: Call, model: str) -> None:
        self.call = call
        self.model = model
        self.offsets = [0] * call.options.num_return_sequences  # completion text so far

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.call.response_id,
            "object": "chat.completion.chunk" if self.call.chat else "text_completion",
            "created": self.call.created, "model": self.model, "choices": choices}
        if self.call.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk has it, the last one filled
        return event(chunk)

    def opening(self) -> list[bytes]:
        """A chat's first chunk per sequence: the assistant's role, no text yet."""
        if not self.call.chat:
            return []
        return [self._chunk([{"index": s, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
                for s in range(self.call.options.num_return_sequences)]

    def text(self, sequence: int, text: str,
             logprobs: tuple[TokenLogprob, ...] | None) -> bytes:
        """New text of one sequence, with its tokens' log-probs when they were asked for."""
        asked = logprobs if self.call.options.logprobs is not None else None
        lp = batchjob.choice_logprobs(asked, self.call.chat, self.offsets[sequence])
        self.offsets[sequence] += len(text)
        choice: dict[str, Any] = {"index": sequence}
        if self.call.chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=lp, finish_reason=None)
        return self._chunk([choice])

    def finished(self, generation: Generation) -> bytes:
        """A sequence's closing chunk: no text, its ``finish_reason``."""
        choice: dict[str, Any] = {"index": generation.sequence}
        if self.call.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        choice.update(logprobs=None, finish_reason=batchjob.finish_reason(generation))
        return self._chunk([choice])

    def usage(self, generations: list[Generation]) -> bytes:
        """The closing usage chunk (``stream_options.include_usage``): no choices."""
        chunk = json.loads(self._chunk([])[len(b"data: "):])
        chunk["usage"] = batchjob.usage(generations)
        return event(chunk)


def error_event(error: ApiError) -> bytes:
    """An error in the middle of a stream (the status was sent already): OpenAI's error body
    as an event; the SDKs raise it."""
    return event(error.body())


COMPLETION_URLS = (COMPLETIONS_URL, CHAT_URL)
