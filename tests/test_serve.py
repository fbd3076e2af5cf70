"""``nlgen serve``: a real server process on the tiny model, driven by the official openai SDK
and by raw HTTP (what an SDK would never send), then stopped as a process manager stops it."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, run_nlgen

KEY = "test-key"
PROMPT = "Once upon a time"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """A ``python -m nlgen serve`` process; its stderr in a file."""

    def __init__(self, model: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nlgen", "serve", "--model", str(model), "--port",
                 str(self.port), "--dtype", "float32", *args], cwd=ROOT, env=env,
                stdout=subprocess.PIPE, stderr=err)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr()
            if get(self.url + "/health")[0] == 200:
                return
            time.sleep(0.1)
        raise AssertionError("the server did not get ready: " + self.stderr())

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def request(method: str, url: str, body: bytes | None = None,
            key: str | None = KEY) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def get(url: str, key: str | None = KEY) -> tuple[int, bytes]:
    return request("GET", url, key=key)


def post(url: str, body: dict | bytes, key: str | None = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, raw = request("POST", url, data, key)
    return status, json.loads(raw)


@pytest.fixture(scope="module")
def chat_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with a chat template."""
    path = tmp_path_factory.mktemp("serve") / "tiny-chat"
    shutil.copytree(tiny_model, path)
    (path / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(chat_model: Path, tmp_path_factory: pytest.TempPathFactory):
    served = Served(chat_model, tmp_path_factory.mktemp("serve-log") / "stderr.txt",
                    "--api-key", KEY, "--served-model-name", "tiny", "-v")
    yield served
    assert served.stop() == 0, served.stderr()


@pytest.fixture(scope="module")
def client(server: Served):
    from openai import OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


# ----------------------------------------------------------------------------- the SDK


def test_completion(client):
    answer = client.completions.create(model="anything-at-all", prompt=PROMPT, max_tokens=8,
                                       temperature=0)
    assert answer.object == "text_completion" and answer.model == "tiny"
    (choice,) = answer.choices
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 8 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + \
        answer.usage.completion_tokens


def test_chat(client):
    answer = client.chat.completions.create(
        model="tiny", max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is the sea?"}])
    assert answer.object == "chat.completion"
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert answer.usage.completion_tokens <= 6


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streamed_completion_is_the_whole_one_in_pieces(client):
    asked = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**asked)
    chunks = list(client.completions.create(**asked, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == whole.choices[0].finish_reason and not any(finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == \
        whole.usage.model_dump()


def test_streamed_chat(client):
    asked = {"model": "tiny", "max_tokens": 8, "temperature": 0,
             "messages": [{"role": "user", "content": "Hello"}]}
    whole = client.chat.completions.create(**asked)
    chunks = list(client.chat.completions.create(**asked, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_the_stream_on_the_wire_ends_with_done(server):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    status, raw = request("POST", server.url + "/v1/completions", body)
    events = raw.decode().split("\n\n")
    assert status == 200 and events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    usage = json.loads(events[-3][len("data: "):])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 4


def test_completion_logprobs(client):
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5,
                                       temperature=0, logprobs=2)
    lp = answer.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == answer.usage.completion_tokens
    assert all(len(top) <= 2 and isinstance(v, float)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    streamed = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5,
                                              temperature=0, logprobs=2, stream=True))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_chat_logprobs(client):
    answer = client.chat.completions.create(
        model="tiny", max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
        messages=[{"role": "user", "content": "Hello"}])
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    plain = client.chat.completions.create(model="tiny", max_tokens=2, temperature=0,
                                           messages=[{"role": "user", "content": "Hello"}])
    assert plain.choices[0].logprobs is None


def test_n_sequences(client):
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, n=3,
                                       seed=5, temperature=1.0)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert 3 <= answer.usage.completion_tokens <= 12  # every sequence's tokens
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, n=3,
                                            seed=5, temperature=1.0, stream=True))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)]
    assert texts == [c.text for c in answer.choices]


def test_stop_cuts_the_text(client):
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                      temperature=0).choices[0].text
    pieces = [whole[i:i + 2] for i in range(2, len(whole) - 1)
              if whole[i:i + 2].isascii() and whole[i:i + 2].strip()]
    if not pieces:
        pytest.skip(f"no plain text to stop at in {whole!r}")
    stop = pieces[0]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                    stop=[stop]).choices[0]
    assert cut.text == whole[:whole.index(stop)] and cut.finish_reason == "stop"


def test_seed_gives_the_text_of_generate_seed(client, chat_model):
    asked = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.9,
             "seed": 11}
    first, second = (client.completions.create(**asked).choices[0].text for _ in range(2))
    assert first == second
    result = run_nlgen("generate", "--model", str(chat_model), "--dtype", "float32",
                       "--seed", "11", "-n", "8", "-t", "0.9", "--format", "jsonl", PROMPT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["completion"] == first


def test_many_clients_at_once(client):
    answers: list[str] = []

    def ask(i: int) -> None:
        answer = client.completions.create(model="tiny", prompt=f"{PROMPT} {i}", max_tokens=6,
                                           temperature=0)
        answers.append(answer.choices[0].text)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 6


# ----------------------------------------------------------------------------- refusals


def test_a_wrong_key_is_refused(server):
    from openai import AuthenticationError, OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as wrong, \
            pytest.raises(AuthenticationError):
        wrong.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    for path in ("/v1/models", "/metrics"):
        status, raw = get(server.url + path, key=None)
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    assert get(server.url + "/health", key=None)[0] == 200  # for load balancers


LONG = "word " * 2000
BAD = [
    ({"prompt": PROMPT, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": PROMPT, "temperature": [1]}, 400, "temperature"),
    ({"prompt": PROMPT, "echo": True}, 400, "echo"),
    ({"prompt": PROMPT, "max_tokens": 9000}, 400, "max_tokens"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": PROMPT, "n": 17, "temperature": 1}, 400, "n"),
    ({"prompt": PROMPT, "logprobs": 21}, 400, "logprobs"),
    ({"prompt": PROMPT, "top_p": 2}, 400, "top_p"),
    ({"prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": PROMPT + LONG[:600]}, 400, "prompt"),  # longer than the context
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"\xff\xfe", 400, None),
    (json.dumps({"prompt": LONG * 120}).encode(), 413, None),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD,
                         ids=[f"{s}-{p}-{i}" for i, (_, s, p) in enumerate(BAD)])
def test_bad_requests_are_refused_and_the_server_goes_on(server, body, status, param):
    got, answer = post(server.url + "/v1/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert post(server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})[0] == 200


def test_a_body_far_over_the_limit_is_refused_before_it_is_sent(server):
    """A Content-Length beyond what the server drains is answered at once, from the headers."""
    from nlgen.serve.app import DRAIN_BYTES

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Authorization", f"Bearer {KEY}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str((1 << 20) + DRAIN_BYTES + 1))
        conn.endheaders()  # and no body: the answer must not wait for it
        response = conn.getresponse()
        assert response.status == 413
        assert "--max-body" in json.loads(response.read())["error"]["message"]
    finally:
        conn.close()
    assert post(server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})[0] == 200


def test_a_bad_chat_request(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    with pytest.raises(BadRequestError, match="max_completion_tokens"):
        client.chat.completions.create(model="tiny", max_completion_tokens=5000,
                                       messages=[{"role": "user", "content": "hi"}])


def test_unknown_routes_and_methods_answer_openai_errors(server):
    status, raw = get(server.url + "/v1/embeddings")
    assert status == 404 and "error" in json.loads(raw)
    status, raw = get(server.url + "/v1/completions")
    assert status == 405 and "error" in json.loads(raw)


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 100, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body,
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the request is no longer in flight
        metrics = get(server.url + "/metrics")[1].decode()
        if "nlgen_requests_in_flight 0.0" in metrics:
            break
        time.sleep(0.1)
    assert "nlgen_requests_in_flight 0.0" in metrics
    assert post(server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 200
    assert get(server.url + "/health")[0] == 200


def test_requests_are_logged_on_stderr_under_v(server):
    get(server.url + "/v1/models")
    deadline = time.monotonic() + 20  # the line is written after the answer: wait for it
    while "nlgen: GET /v1/models 200" not in server.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "nlgen: GET /v1/models 200" in server.stderr()


# ----------------------------------------------------------------------------- the process


def test_sigterm_drains_the_requests_in_flight_and_exits_0(chat_model, tmp_path):
    # One slot, no queue: a request of 16 sequences holds the slot for 16 decodes in turn.
    served = Served(chat_model, tmp_path / "stderr.txt", "--slots", "1", "--max-queue", "0")
    try:
        body = json.dumps({"prompt": PROMPT, "max_tokens": 100, "n": 16, "stream": True})
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        busy, answer = post(served.url + "/v1/completions", {"prompt": PROMPT}, key=None)
        served.proc.send_signal(signal.SIGTERM)
        raw = response.read()
        conn.close()
        assert served.proc.wait(30) == 0, served.stderr()
    finally:
        served.stop()
    assert raw.endswith(b"data: [DONE]\n\n")  # finished, not cut
    finished = [json.loads(line[6:])["choices"][0]["index"] for line in raw.splitlines()
                if line.startswith(b"data: {") and b'"finish_reason":"' in line]
    assert sorted(finished) == list(range(16))
    assert busy == 503 and answer["error"]["type"] == "server_error"


def test_ctrl_c_cancels_and_exits_130(chat_model, tmp_path):
    served = Served(chat_model, tmp_path / "stderr.txt")
    code = served.stop(signal.SIGINT)
    assert code == 130 and "Error: interrupted" in served.stderr()
    assert served.proc.stdout.read() == b""  # notices go to stderr; stdout carries nothing


def test_a_port_in_use_is_an_error(server, chat_model):
    result = run_nlgen("serve", "--model", str(chat_model), "--port", str(server.port),
                       timeout=60)
    assert result.returncode == 1
    assert b"Error: cannot listen on 127.0.0.1:" in result.stderr


# ----------------------------------------------------------------------------- the CLI


def test_serve_help(cli):
    result = cli("serve", "--help")
    assert result.exit_code == 0
    for option in ("--host", "--port", "--api-key", "--max-n", "--max-queue", "--slots"):
        assert option in result.stdout


@pytest.mark.parametrize(("args", "words"), [
    (["--port", "70000"], "Invalid value for '--port'"),
    (["--max-n", "0"], "--max-n must be at least 1"),
    (["--api-key", " "], "--api-key is empty"),
    (["--drain-timeout", "-1"], "--drain-timeout must be 0 or more"),
    (["--slots", "many"], "Invalid value for '--slots'"),
])
def test_bad_options_exit_2_before_anything_loads(cli, args, words):
    result = cli("serve", "--model", "./does-not-matter", *args)
    assert result.exit_code == 2 and words in result.stderr, result.stderr


# ----------------------------------------------------------------------------- in process


class _Ticket:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Stalled:
    """Stands for the engine: takes a request, sends one piece of text, then nothing more."""

    def __init__(self) -> None:
        self.tickets: list[_Ticket] = []

    def submit(self, prompt, opts, on_event):
        from nlgen.engine.continuous import Delta

        on_event(Delta(0, "a", ()))
        self.tickets.append(_Ticket())
        return self.tickets[-1]


def _drive(body: dict, leave_after: int) -> tuple[list[dict], _Stalled]:
    """Send ``body`` to the app in process; the client disconnects after ``leave_after``
    messages from the server (0: at once)."""
    import asyncio

    from nlgen.serve.app import State, create_app
    from nlgen.serve.options import ServeOptions

    engine = _Stalled()
    state = State(ServeOptions(), engine=engine, name="m", context=128)
    app = create_app(state)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"",
             "query_string": b"", "root_path": "", "headers": [],
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000)}
    sent: list[dict] = []

    async def run() -> None:
        gone = asyncio.Event()
        messages = [{"type": "http.request", "body": json.dumps(body).encode(),
                     "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            if leave_after == 0:
                await asyncio.sleep(0.05)
            else:
                await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if len(sent) >= leave_after:
                gone.set()

        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(run())
    return sent, engine


def test_a_stream_whose_client_leaves_cancels_its_ticket():
    sent, engine = _drive({"prompt": "x", "stream": True}, leave_after=2)
    assert sent[0]["status"] == 200 and sent[1]["body"].startswith(b"data: ")
    assert [t.cancelled for t in engine.tickets] == [True]


def test_a_client_that_leaves_before_its_answer_cancels_its_ticket():
    _, engine = _drive({"prompt": "x"}, leave_after=0)
    assert [t.cancelled for t in engine.tickets] == [True]
