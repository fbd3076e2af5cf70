"""Batch files of requests, and the records a job writes back: nlgen's own and OpenAI's.

A ``.jsonl`` prompt file holds one of two record formats, told apart by their fields:

- **nlgen prompts**: ``{"prompt": "..."}`` or ``{"messages": [{"role": ..., "content": ...}]}``,
  with any of :data:`nlgen.jobs.record_options.OPTION_FIELDS` as per-record sampling options and
  an optional ``id`` echoed back. Answered with ``nlgen generate --format jsonl`` records, one
  per sequence.
- **OpenAI batch requests**, the input file of the OpenAI Batch API and of ``vllm run-batch``:
  ``{"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
  "body": {"model", "prompt" | "messages", "max_tokens", "temperature", "top_p", "n", "stop",
  "seed", ...}}``. Answered with the Batch API's output lines: ``{"id", "custom_id",
  "response": {"status_code", "request_id", "body": a completion object with "choices" and
  "usage"}, "error"}``.

Field names follow OpenAI's API reference (the batch request input and output objects, the
completion and chat completion objects) and vLLM's ``vllm/entrypoints/openai/run_batch.py``
(``BatchRequestInput``, ``BatchRequestOutput``, ``BatchResponseData``).

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from nlgen import inputs
from nlgen.engine import token_logprobs
from nlgen.engine.generation import Generation
from nlgen.engine.options import GenerationOptions
from nlgen.errors import InputError, UsageError
from nlgen.inputs import Prompt, Record
from nlgen.jobs import record_options
from nlgen.jobs.record_options import FieldError
from nlgen.score.likelihood import TokenLogprob

TEXT = "text"  # plain prompts: arguments, or a text file one a line
PROMPTS = "prompts"  # a .jsonl file of nlgen prompt records
OPENAI = "openai"  # a .jsonl file of OpenAI batch requests
CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
KEY_FIELDS: dict[str, tuple[str, ...]] = {TEXT: ("index", "sequence"),
                                          PROMPTS: ("index", "sequence"), OPENAI: ("id",)}

# Accepted and left alone: the model is the job's --model (the server's model); `user` is for
# OpenAI's abuse checks; `stream` is the caller's (a batch refuses it, the server streams).
IGNORED_BODY_FIELDS = {"model", "user", "stream"}


@dataclass(frozen=True)
class Request:
    """One record of a job: what to generate and how, or why the record is bad."""

    index: int  # place among the job's requests (0-based): names its output records
    line: int | None  # line in its file (None for a prompt argument)
    prompt: Prompt | None = None  # None when the record is bad
    options: GenerationOptions | None = None
    custom_id: str | None = None  # OpenAI format
    url: str | None = None  # OpenAI format: which endpoint the request is for
    id: Any = None  # nlgen prompt records: the record's own "id", echoed back
    error: str | None = None
    source: str = ""  # the file's name, to name the record in a message
    length_field: str | None = None  # the field that set the record's own max new tokens
    duplicate_of: int | None = None  # the line that used the same custom_id first

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def sequences(self) -> int:
        return self.options.num_return_sequences if self.options is not None else 1


@dataclass(frozen=True)
class Result:
    """A request's answer: its sequences in order, or (for a bad request) none."""

    request: Request
    generations: tuple[Generation, ...] = ()

    @property
    def new_tokens(self) -> int:
        return sum(g.completion_tokens for g in self.generations)


# ----------------------------------------------------------------------------- reading


def detect_format(lines: Iterable[Record]) -> str:
    """OPENAI when the first JSON object has the batch request's fields, else PROMPTS."""
    for item in lines:
        if item.fields is not None:
            return OPENAI if {"custom_id", "body"} & set(item.fields) else PROMPTS
    return PROMPTS


def parse_records(lines: Iterable[Record], fmt: str, base: GenerationOptions,
                  ) -> Iterator[Request]:
    """A Request per record, in order; a bad record becomes a Request with its error."""
    first_line: dict[str, int] = {}  # custom_id -> the line that used it first
    for index, item in enumerate(lines):
        custom_id = (item.fields or {}).get("custom_id")
        custom_id = custom_id if isinstance(custom_id, str) and custom_id else None
        if fmt == OPENAI and custom_id in first_line:
            yield Request(index, item.line, custom_id=custom_id, source=item.name,
                          duplicate_of=first_line[custom_id],
                          error=f"line {item.line}: custom_id {custom_id!r} is used twice "
                                f"(first on line {first_line[custom_id]})")
            continue
        if custom_id is not None:
            first_line[custom_id] = item.line
        try:
            if item.fields is None:
                raise ValueError(item.problem)
            if fmt == OPENAI:
                request = _openai_request(index, item, base)
            else:
                request = _prompt_request(index, item, base)
        except ValueError as exc:
            yield Request(index, item.line, custom_id=custom_id, source=item.name,
                          error=f"line {item.line}: {exc}")
            continue
        yield dataclasses.replace(request, source=item.name)


def text_requests(prompts: Iterable[Prompt], base: GenerationOptions) -> Iterator[Request]:
    """Plain prompts (arguments, or lines of a text file) as requests with the job's options."""
    for index, prompt in enumerate(prompts):
        yield Request(index, prompt.line, prompt, base)


def _prompt_request(index: int, item: Record, base: GenerationOptions) -> Request:
    record = dict(item.fields or {})
    prompt = _prompt(record, item.line, messages_allowed=True, where="")
    record_id = record.pop("id", None)
    options = record_options.overlay(record, base, where="")
    return Request(index, item.line, prompt, options, id=record_id,
                   length_field=record_options.length_field(record, ""))


def _openai_request(index: int, item: Record, base: GenerationOptions) -> Request:
    record = dict(item.fields or {})
    custom_id = record.pop("custom_id", None)
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError("no custom_id (a non-empty string)")
    method = record.pop("method", "POST")
    if method != "POST":
        raise ValueError(f"method {method!r}: only POST is supported")
    url = record.pop("url", None)
    if url not in (COMPLETIONS_URL, CHAT_URL):
        raise ValueError(f"url {url!r}: nlgen answers {COMPLETIONS_URL} and {CHAT_URL}")
    body = record.pop("body", None)
    if not isinstance(body, dict):
        raise ValueError("no body (a JSON object)")
    if record:
        raise ValueError(f"unknown field {sorted(record)[0]!r} (a request has custom_id, "
                         "method, url and body)")
    if body.get("stream"):
        raise ValueError("body.stream: a batch request cannot be streamed")
    parsed = parse_body(body, url, base, where="body.", line=item.line)
    return Request(index, item.line, parsed.prompt, parsed.options, custom_id=custom_id,
                   url=url, length_field=parsed.length_field)


class ParsedBody(NamedTuple):
    """An OpenAI request body as nlgen runs it."""

    prompt: Prompt
    options: GenerationOptions
    length_field: str | None  # the field that set its own max new tokens (``max_tokens``)


def parse_body(body: dict[str, Any], url: str, base: GenerationOptions, *, where: str = "",
               line: int | None = None) -> ParsedBody:
    """The prompt and options of an OpenAI ``/v1/completions`` or ``/v1/chat/completions``
    request body (``url``), over the options ``base``: what a batch request and ``nlgen serve``
    both run. ``model``, ``user`` and ``stream`` are left to the caller; every other field
    nlgen does not take is refused. Raises ValueError naming the field (``where`` prefixes its
    name: ``body.``); a :class:`record_options.FieldError` also carries the field's own name.
    """
    body = dict(body)
    for name in IGNORED_BODY_FIELDS:
        body.pop(name, None)
    chat = url == CHAT_URL
    prompt = _prompt(body, line, messages_allowed=chat, where=where)
    options = record_options.overlay(body, dataclasses.replace(base, chat=False), where,
                                     logprobs=record_options.CHAT if chat
                                     else record_options.COMPLETIONS)
    return ParsedBody(prompt, options, record_options.length_field(body, where))


def _prompt(record: dict[str, Any], line: int | None, *, messages_allowed: bool,
            where: str) -> Prompt:
    """Pop the prompt (``prompt``, or a chat's ``messages``) out of ``record``."""
    if "messages" in record and messages_allowed:
        messages = _messages(record.pop("messages"), where)
        if "prompt" in record:
            raise FieldError(f"{where}prompt and {where}messages: give one", "prompt")
        return Prompt(messages[-1]["content"], line, messages=messages)
    if "prompt" not in record:
        wanted = f"{where}prompt or {where}messages" if messages_allowed else f"{where}prompt"
        raise FieldError(f"no {wanted} field", "messages" if messages_allowed else "prompt")
    text = record.pop("prompt")
    if isinstance(text, list) and len(text) == 1:  # OpenAI allows a list of prompts
        text = text[0]
    if not isinstance(text, str):
        raise FieldError(f"{where}prompt is not a string (one prompt per request)", "prompt")
    if not text.strip():
        raise FieldError(f"{where}prompt is empty", "prompt")
    return Prompt(text, line)


def _messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise FieldError(f"{where}messages is not a non-empty list", "messages")
    messages = []
    for number, message in enumerate(value, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise FieldError(f"{where}messages[{number - 1}] has no role", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text can be read by a text model
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise FieldError(f"{where}messages[{number - 1}]: only text content is "
                                 "supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise FieldError(f"{where}messages[{number - 1}] has no text content",
                             "messages")
        messages.append({"role": message["role"], "content": content})
    return tuple(messages)


@dataclass
class RequestFile:
    """A .jsonl request file, checked: its format and how many records, bad ones included."""

    name: str
    fmt: str
    count: int
    bad: list[Request]
    _read: Callable[[], Iterator[Request]]

    def requests(self) -> Iterator[Request]:
        return self._read()


def load_requests(name: str, base: GenerationOptions, *, skip_bad: bool) -> RequestFile:
    """Check every record of ``name`` before anything is generated; a bad one stops the job
    (exit 2) unless ``skip_bad``. A file is read again to generate (memory stays flat);
    stdin, which cannot be, is kept.
    """
    if name == inputs.STDIN:
        kept = list(inputs.iter_records(name))

        def lines() -> Iterator[Record]:
            return iter(kept)
    else:
        def lines() -> Iterator[Record]:
            return inputs.iter_records(name)

    fmt = detect_format(lines())

    def read() -> Iterator[Request]:
        return parse_records(lines(), fmt, base)

    bad: list[Request] = []
    count = 0
    for request in read():
        count += 1
        if not request.ok:
            bad.append(request)
    shown = inputs.display_name(name)
    twice = next((r for r in bad if r.duplicate_of is not None), None)
    if twice is not None:  # answers are matched to requests by custom_id: it must be unique
        raise UsageError(f"{shown} lines {twice.duplicate_of} and {twice.line} have the same "
                         f"custom_id {twice.custom_id!r}",
                         hint="give every request a custom_id of its own")
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more bad records)" if len(bad) > 1 else ""
        raise UsageError(f"{shown} {bad[0].error}{more}",
                         hint="fix the records, or pass --skip-bad to answer each bad one with "
                              "an error record and go on")
    if count == 0:
        raise InputError(f"{shown} holds no records: nothing to generate",
                         hint="blank lines are not records")
    return RequestFile(name, fmt, count, bad, read)


def is_done(fmt: str, request: Request, done: frozenset, job: str = "") -> bool:
    """Whether a resumed job's output already answers ``request`` (all of its sequences).

    ``job``: the job id that names its OpenAI-format lines (:func:`record_id`)."""
    if fmt == OPENAI:
        return record_id(request.index, job) in done
    if (request.index, None) in done:  # answered with an error record
        return True
    return all((request.index, s) in done for s in range(request.sequences))


def answered(fmt: str, done: frozenset) -> int:
    """How many requests the keys of a resumed job's output answer (in part or in full)."""
    return len(done) if fmt == OPENAI else len({key[0] for key in done})


# ----------------------------------------------------------------------------- writing


def record_id(index: int, job: str = "") -> str:
    """The ``id`` of an OpenAI-format output line: unique to its job (``job``, the job id that
    a resumed job keeps) and stable, so that --resume can find it."""
    return f"nlgen-{job}-{index}" if job else f"nlgen-{index}"


def records(fmt: str, result: Result, model: str, job: str = "") -> list[dict[str, Any]]:
    """The output records answering one request, in the job's format (``job``: the job id)."""
    if fmt == OPENAI:
        return [openai_record(result, model, job)]
    if not result.request.ok:
        request = result.request
        return [{"index": request.index, "line": request.line, "sequence": None,
                 **({"id": request.id} if request.id is not None else {}),
                 "error": request.error}]
    return [generation_record(g, model, result.request.id) for g in result.generations]


def generation_record(result: Generation, model: str, record_id: Any = None) -> dict[str, Any]:
    """``nlgen generate --format jsonl``: one object per generated sequence."""
    record: dict[str, Any] = {"index": result.index}
    if result.line is not None:
        record["line"] = result.line
    if record_id is not None:
        record["id"] = record_id
    record.update({
        "sequence": result.sequence, "prompt": result.prompt,
        "completion": result.completion, "text": result.text, "model": model,
        "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
    })
    if result.logprobs is not None:
        record["logprobs"] = {"content": token_logprobs.openai_content(result.logprobs)}
    return record


# nlgen's finish reasons -> OpenAI's: an end-of-sequence token and a stop string both "stop".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "time": "length"}


def openai_record(result: Result, model: str, job: str = "") -> dict[str, Any]:
    """One line of a Batch API output file: the response to one request, or its error (with
    the request's ``line``: a line that is not JSON has no custom_id to name it)."""
    request = result.request
    suffix = record_id(request.index, job).removeprefix("nlgen-")
    line: dict[str, Any] = {"id": record_id(request.index, job),
                            "custom_id": request.custom_id}
    request_id = f"nlgen-req-{suffix}"
    if not request.ok:
        line["line"] = request.line
        param = (request.length_field or "").removeprefix("body.") or None
        line["response"] = {"status_code": 400, "request_id": request_id,
                            "body": error_body(str(request.error), param)}
        line["error"] = None
        return line
    body = response_body(request.url or COMPLETIONS_URL, result.generations, model,
                         f"{'chatcmpl' if request.url == CHAT_URL else 'cmpl'}-nlgen-{suffix}")
    line["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    line["error"] = None
    return line


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def response_body(url: str, generations: Iterable[Generation], model: str, response_id: str,
                  created: int | None = None) -> dict[str, Any]:
    """The completion object that answers an OpenAI request to ``url`` (``/v1/completions`` or
    ``/v1/chat/completions``) with its sequences: a batch output line's body, and what
    ``nlgen serve`` answers."""
    chat = url == CHAT_URL
    generations = tuple(generations)
    choices = []
    for g in generations:
        choice: dict[str, Any] = {"index": g.sequence}
        if chat:
            choice["message"] = {"role": "assistant", "content": g.completion}
        else:
            choice["text"] = g.completion
        choice.update(logprobs=choice_logprobs(g.logprobs, chat),
                      finish_reason=finish_reason(g))
        choices.append(choice)
    return {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()) if created is None else created, "model": model,
        "choices": choices, "usage": usage(generations),
    }


def finish_reason(g: Generation) -> str:
    """A sequence's OpenAI ``finish_reason``."""
    return FINISH_REASONS.get(g.finish_reason, "stop")


def usage(generations: Iterable[Generation]) -> dict[str, int]:
    """OpenAI's ``usage`` of one request: its prompt once, every sequence's new tokens."""
    generations = tuple(generations)
    prompt = generations[0].prompt_tokens if generations else 0
    new = sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


def choice_logprobs(tokens: tuple[TokenLogprob, ...] | None, chat: bool,
                    offset: int = 0) -> dict[str, Any] | None:
    """A choice's ``logprobs`` as each endpoint gives them: a chat's ``{"content": [...]}``;
    a completion's ``tokens``, ``token_logprobs``, ``top_logprobs`` (one {token: logprob} per
    token) and ``text_offset`` (where each token starts in the completion's text; ``offset``:
    where ``tokens`` start, for a streamed piece)."""
    if tokens is None:
        return None
    content = token_logprobs.openai_content(tokens)
    if chat:
        return {"content": content}
    offsets, at = [], offset
    for token in content:
        offsets.append(at)
        at += len(token["token"])
    return {"tokens": [t["token"] for t in content],
            "token_logprobs": [t["logprob"] for t in content],
            "top_logprobs": [{a["token"]: a["logprob"] for a in t["top_logprobs"]}
                             for t in content],
            "text_offset": offsets}
