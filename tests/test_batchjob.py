"""nlgen.jobs.batchjob: request records in (nlgen prompts, OpenAI batch requests), records out."""

from __future__ import annotations

import json

import pytest

from nlgen import inputs
from nlgen.engine.generation import Generation
from nlgen.engine.options import GenerationOptions
from nlgen.errors import UsageError
from nlgen.inputs import Record
from nlgen.jobs import batchjob
from nlgen.jobs.batchjob import OPENAI, PROMPTS, Request, Result

BASE = GenerationOptions(max_new_tokens=8, greedy=True)


def parse(*values, fmt=None, base=BASE):
    lines = [inputs.parse_record("t", n, json.dumps(v)) if not isinstance(v, Exception)
             else Record("t", n, problem=str(v)) for n, v in enumerate(values, 1)]
    return list(batchjob.parse_records(lines, fmt or batchjob.detect_format(lines), base))


def openai(custom_id="r1", url="/v1/completions", **body):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_format_is_told_by_the_fields():
    assert batchjob.detect_format([Record("t", 1, {"prompt": "a"})]) == PROMPTS
    assert batchjob.detect_format([Record("t", 1, problem="x"), Record("t", 2, openai())]) == OPENAI
    assert batchjob.detect_format([]) == PROMPTS


def test_prompt_records_and_their_overrides():
    plain, sampled, chat = parse(
        {"prompt": "The fox", "id": 7},
        {"prompt": "At night", "max_tokens": 3, "temperature": 0.7, "n": 2, "stop": ".",
         "seed": 4},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert plain.options == BASE and plain.id == 7 and plain.prompt.text == "The fox"
    opts = sampled.options
    assert (opts.max_new_tokens, opts.temperature, opts.num_return_sequences, opts.stop,
            opts.seed, opts.greedy) == (3, 0.7, 2, (".",), 4, False)
    assert chat.prompt.messages == ({"role": "user", "content": "hi"},)
    assert [r.index for r in (plain, sampled, chat)] == [0, 1, 2]


def test_temperature_zero_is_greedy_and_drops_sampling_options():
    base = GenerationOptions(top_p=0.9, temperature=0.8)
    (request,) = parse(openai(prompt="x", temperature=0, top_p=0.5), base=base)
    assert request.options.greedy and request.options.top_p is None
    assert request.options.chat is False  # /v1/completions: the prompt as it is


def test_openai_requests():
    chat, text = parse(
        openai("a", "/v1/chat/completions", model="gpt-4o-mini", max_tokens=5,
               messages=[{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "What is 2+2?"}]),
        openai("b", prompt=["one prompt"], max_completion_tokens=2, user="u"))
    assert (chat.custom_id, chat.url, chat.options.max_new_tokens) == (
        "a", "/v1/chat/completions", 5)
    assert chat.prompt.messages[0]["role"] == "system" and chat.prompt.text == "What is 2+2?"
    assert (text.custom_id, text.prompt.text, text.options.max_new_tokens) == ("b", "one prompt",
                                                                                 2)


BAD = [
    ({"text": "a"}, "no prompt or messages field"),
    ({"prompt": "a", "presence_penalty": 1}, "unknown option presence_penalty"),
    ({"prompt": "a", "top_p": 1.5}, "--top-p must be in (0, 1]"),
    ({"prompt": "a", "n": 2, "temperature": 0}, "greedy decoding gives one sequence"),
    ({"prompt": "a", "max_tokens": "ten"}, "max_tokens is not a number"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens is not an integer"),
    ({"prompt": "a", "stop": [1]}, "stop is not a string or a list"),
    ({"prompt": "  "}, "prompt is empty"),
    (["a"], "a JSON array, not an object"),
    (ValueError("not JSON (Expecting value at column 1)"), "not JSON"),
]


@pytest.mark.parametrize(("value", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_prompt_records_say_which_line_and_why(value, message):
    _, bad = parse({"prompt": "fine"}, value, fmt=PROMPTS)
    assert not bad.ok and bad.error.startswith("line 2: ") and message in bad.error


BAD_OPENAI = [
    ({"method": "POST", "url": "/v1/completions", "body": {"prompt": "a"}}, "no custom_id"),
    (openai("x", "/v1/embeddings", input="a"), "url '/v1/embeddings'"),
    (openai("x", prompt="a", stream=True), "cannot be streamed"),
    (openai("x", messages=[{"role": "user", "content": "a"}]), "no body.prompt field"),
    ({**openai("x", prompt="a"), "extra": 1}, "unknown field 'extra'"),
    (openai("r1", prompt="again"), "custom_id 'r1' is used twice"),
    (openai("x", "/v1/chat/completions", messages=[{"content": "a"}]), "has no role"),
]


@pytest.mark.parametrize(("value", "message"), BAD_OPENAI, ids=[m for _, m in BAD_OPENAI])
def test_bad_openai_requests(value, message):
    _, bad = parse(openai("r1", prompt="fine"), value, fmt=OPENAI)
    assert bad.error.startswith("line 2: ") and message in bad.error


def test_load_requests_stops_before_generating_unless_told(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": 1}\nnope\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"r.jsonl line 3: prompt is not a string .*1 more"):
        batchjob.load_requests(str(path), BASE, skip_bad=False)
    loaded = batchjob.load_requests(str(path), BASE, skip_bad=True)
    assert (loaded.fmt, loaded.count, len(loaded.bad)) == (PROMPTS, 3, 2)
    assert [r.line for r in loaded.requests()] == [1, 3, 4]  # read again, lazily


def gen(index, sequence, completion="x", reason="eos"):
    return Generation(index, sequence, "p", completion, 3, 2, reason, line=index + 1)


def test_openai_response_shape():
    (request,) = parse(openai("c1", "/v1/chat/completions",
                              messages=[{"role": "user", "content": "hi"}], n=2,
                              temperature=1.0))
    (line,) = batchjob.records(OPENAI, Result(request, (gen(0, 0, "a"), gen(0, 1, "b", "length"))),
                               "m")
    assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
    response = line["response"]
    assert set(response) == {"status_code", "request_id", "body"}
    body = response["body"]
    assert (body["object"], body["model"], response["status_code"]) == ("chat.completion", "m",
                                                                         200)
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "a"}, "logprobs": None,
         "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "b"}, "logprobs": None,
         "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    json.dumps(line)  # plain JSON


def test_error_records_and_resume_keys():
    good, bad = parse(openai("a", prompt="x"), openai("b"), fmt=OPENAI)
    (line,) = batchjob.records(OPENAI, Result(bad), "m")
    assert line["custom_id"] == "b" and line["response"]["status_code"] == 400
    assert "no body.prompt" in line["response"]["body"]["error"]["message"]
    assert batchjob.is_done(OPENAI, good, frozenset({"nlgen-0"}))
    assert not batchjob.is_done(OPENAI, bad, frozenset({"nlgen-0"}))
    plain = Request(4, 5, options=GenerationOptions(num_return_sequences=2))
    assert not batchjob.is_done(PROMPTS, plain, frozenset({(4, 0)}))  # one sequence missing
    assert batchjob.is_done(PROMPTS, plain, frozenset({(4, 0), (4, 1)}))
    assert batchjob.is_done(PROMPTS, plain, frozenset({(4, None)}))  # its error record
    assert batchjob.answered(PROMPTS, frozenset({(4, 0), (4, 1), (5, None)})) == 2
