"""Jobs past one process: torchrun / accelerate launch against one process, --output/--resume,
jsonl and OpenAI batch files, bad records. Launched runs use two CPU processes (gloo).

Generation runs in float32: dtype auto picks bfloat16 on CPUs with native bfloat16, whose
rounding depends on the shape of the batch, so that a prompt's text can change with its batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CORPUS, ROOT, kill_after

from nlgen.errors import EXIT_FAILURE, EXIT_USAGE

WORDS = ("the fox river night once upon a time there was a little model that measured how "
         "wide and slow the summer was").split()


def launch(*args: str, launcher: str = "torchrun", timeout: float = 300):
    """``nlgen ARGS`` on two processes, as a user starts it (OMP_NUM_THREADS=1 each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if launcher == "torchrun":
        start = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:  # on a machine without GPUs, --multi_gpu is accelerate's way to N CPU processes
        start = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run([sys.executable, "-m", *start, "-m", "nlgen", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[:4000] + "\n...\n" + proc.stderr[-1500:]
    return proc


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """24 prompts of 1 to 9 words (unequal lengths: batches pad), one a line."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 9))
             for i in range(24)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_greedy_two_processes_write_the_same_file(cli, tiny_model, prompts, tmp_path):
    args = ["generate", "--model", str(tiny_model), "--dtype", "float32", "--greedy", "-n", "10",
            "-b", "4", "-f", str(prompts), "--output"]
    one = cli(*args, str(tmp_path / "one.jsonl"))
    assert one.exit_code == 0, one.stderr
    two = launch(*args, str(tmp_path / "two.jsonl"))
    assert two.stdout == ""  # records go to the file, written by rank 0 alone
    assert "Error" not in two.stderr
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert [r["index"] for r in rows(tmp_path / "two.jsonl")] == list(range(24))


@pytest.mark.slow
def test_seeded_sampling_is_the_same_at_any_scale(cli, tiny_model, tmp_path):
    """Records with options of their own (some greedy, some sampled twice), --seed: the same
    text per (prompt, sequence) at batch sizes 1 and 8, on one process or two."""
    path = tmp_path / "records.jsonl"
    records = []
    for i in range(16):
        record = {"prompt": " ".join(WORDS[i:i + 1 + i % 5])}
        record.update([{"n": 2}, {"temperature": 0}, {"temperature": 0.8, "top_k": 20},
                       {}][i % 4])
        records.append(json.dumps(record))
    path.write_text("\n".join(records) + "\n", encoding="utf-8")
    args = ["generate", "--model", str(tiny_model), "--dtype", "float32", "-n", "8", "--seed", "5",
            "-f", str(path)]

    def texts(found: list[dict]) -> dict:
        return {(r["index"], r["sequence"]): r["completion"] for r in found}

    runs = [texts(map(json.loads, cli(*args, "-b", b, "--format", "jsonl").stdout.splitlines()))
            for b in ("1", "8")]
    launch(*args, "-b", "8", "--output", str(tmp_path / "two.jsonl"))
    runs.append(texts(rows(tmp_path / "two.jsonl")))
    assert len(runs[0]) == 16 + 4  # four records asked for two sequences
    assert runs[0] == runs[1] == runs[2]
    assert sum(runs[0][(i, 0)] != runs[0][(i, 1)] for i in range(0, 16, 4)) >= 3  # it sampled


def _same_scores(one: list[dict], two: list[dict]) -> None:
    assert [(r["input"], r.get("line"), r["tokens"]) for r in one] == [
        (r["input"], r.get("line"), r["tokens"]) for r in two]
    for a, b in zip(one, two):
        assert math.isclose(a["nll_sum"], b["nll_sum"], rel_tol=1e-6)
        assert math.isclose(a["perplexity"], b["perplexity"], rel_tol=1e-6)


@pytest.mark.slow
def test_perplexity_of_one_long_text_is_shared_by_window(cli, tiny_model):
    args = ["perplexity", "--model", str(tiny_model), "--max-length", "32", "--stride", "24",
            "--format", "jsonl", str(CORPUS)]
    one = [json.loads(line) for line in cli(*args).stdout.splitlines()]
    two = [json.loads(line) for line in launch(*args).stdout.splitlines()]
    assert one[0]["method"]["windows"] > 100  # many windows, shared by the two ranks
    _same_scores(one, two)


@pytest.mark.slow
def test_perplexity_per_line_under_accelerate_launch(cli, tiny_model, tmp_path):
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines[:30]) + "\n", encoding="utf-8")  # long lines among them
    args = ["perplexity", "--model", str(tiny_model), "--max-length", "64", "--per-line",
            str(path), "--output"]
    assert cli(*args, str(tmp_path / "one.jsonl")).exit_code == 0
    run = launch(*args, str(tmp_path / "two.jsonl"), launcher="accelerate")
    # rank 0's closing line alone, with the corpus total of the file
    assert [line.split(": ")[0] for line in run.stderr.splitlines()] == ["nlgen"]
    one, two = rows(tmp_path / "one.jsonl"), rows(tmp_path / "two.jsonl")
    assert max(r["method"]["windows"] for r in one) > 1
    _same_scores(one, two)


def test_stdin_is_refused_under_several_processes(cli, tiny_model):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    for args in (["generate", "--model", str(tiny_model)], ["perplexity", "-"]):
        result = cli(*args, input="The fox\n", env=env)
        assert result.exit_code == EXIT_USAGE
        assert "stdin cannot feed 2 processes" in result.stderr


# ----------------------------------------------------------------------------- crash and resume


def test_a_killed_job_resumes_to_the_clean_result(cli, tiny_model, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(" ".join(WORDS[i % 20:i % 20 + 1 + i % 6]) for i in range(40))
                    + "\n", encoding="utf-8")
    args = ["generate", "--model", str(tiny_model), "--dtype", "float32", "--greedy", "-n", "8",
            "-b", "2", "-f", str(path), "--output"]
    clean = tmp_path / "clean.jsonl"
    assert cli(*args, str(clean)).exit_code == 0
    out = tmp_path / "out.jsonl"
    killed = kill_after(args, out, 4)
    assert 4 <= killed.count(b"\n") < 40, "the job was not killed halfway"
    with out.open("ab") as f:  # as if the kill had cut a record in half
        f.write(b'{"index": 39, "seq')
    resumed = cli(*args, str(out), "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert "dropped an unfinished last record" in resumed.stderr
    assert out.read_bytes() == clean.read_bytes()  # every record once, in input order


def test_output_and_resume_misuse(cli, tiny_model, prompts, tmp_path):
    base = ["generate", "--model", str(tiny_model), "-f", str(prompts)]
    result = cli(*base, "--resume")
    assert result.exit_code == EXIT_USAGE and "--resume continues a job" in result.stderr
    taken = tmp_path / "taken.jsonl"
    taken.write_text("{}\n", encoding="utf-8")
    result = cli(*base, "--output", str(taken))
    assert result.exit_code == EXIT_FAILURE and "pass --resume" in result.stderr


# ----------------------------------------------------------------------------- batch files


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a chat template (for /v1/chat/completions requests)."""
    path = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_model, path)
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}", encoding="utf-8")
    return path


def test_openai_batch_round_trip(cli, chat_model, tmp_path):
    requests = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "max_tokens": 6, "temperature": 0,
                  "messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "What is the sea?"}]}},
        {"custom_id": "text-2", "method": "POST", "url": "/v1/completions",
         "body": {"model": "gpt-3.5-turbo-instruct", "prompt": "The fox", "max_tokens": 5,
                  "n": 2, "seed": 3, "stop": ["\n"], "top_p": 0.9}},
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests), encoding="utf-8")
    out = tmp_path / "batch_output.jsonl"
    result = cli("generate", "--model", str(chat_model), "-f", str(path), "--output", str(out))
    assert result.exit_code == 0, result.stderr
    chat, text = rows(out)
    for line, request in zip((chat, text), requests):
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["custom_id"] == request["custom_id"] and line["error"] is None
        assert set(line["response"]) == {"status_code", "request_id", "body"}
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
        usage = body["usage"]
        assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    chat_body, text_body = chat["response"]["body"], text["response"]["body"]
    assert chat_body["object"] == "chat.completion"
    (choice,) = chat_body["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert text_body["object"] == "text_completion"
    assert [set(c) for c in text_body["choices"]] == [{"index", "text", "logprobs",
                                                       "finish_reason"}] * 2
    assert [c["index"] for c in text_body["choices"]] == [0, 1]
    # The chat prompt went through the template: system and user turns both counted.
    assert chat_body["usage"]["prompt_tokens"] > 10


def test_bad_records_stop_the_job_before_the_model_loads(cli, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "The fox"}\n{"prompt": "x", "temprature": 1}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = cli("generate", "--model", str(tmp_path / "no-such-model"), "-f", str(path),
                 "--output", str(out))
    assert result.exit_code == EXIT_USAGE  # a missing model would have been exit 1
    assert "prompts.jsonl line 2: unknown option temprature" in result.stderr
    assert "--skip-bad" in result.stderr
    assert not out.exists()


def test_skip_bad_answers_with_an_error_record_and_exits_1(cli, tiny_model, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "The fox", "id": "a"}\n{"prompt": 3}\nnot json\n'
                    '{"prompt": "At night", "max_tokens": 2}\n', encoding="utf-8")
    result = cli("generate", "--model", str(tiny_model), "--greedy", "-n", "4", "-f", str(path),
                 "--format", "jsonl", "--skip-bad")
    assert result.exit_code == EXIT_FAILURE
    assert "2 bad records answered with an error record" in result.stderr
    found = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["index"], r["line"], "error" in r) for r in found] == [
        (0, 1, False), (1, 2, True), (2, 3, True), (3, 4, False)]
    assert found[0]["id"] == "a" and found[3]["completion_tokens"] <= 2
    assert found[1]["error"] == "line 2: prompt is not a string (one prompt per request)"


def test_records_from_stdin(cli, tiny_model):
    records = '{"prompt": "The fox"}\n\n{"prompt": "At night", "max_tokens": 2}\n'
    result = cli("generate", "--model", str(tiny_model), "--greedy", "-n", "3",
                 "--input-format", "jsonl", "--format", "jsonl", input=records)
    assert result.exit_code == 0, result.stderr
    found = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["line"], r["prompt"]) for r in found] == [(1, "The fox"), (3, "At night")]
    assert found[1]["completion_tokens"] <= 2
    empty = cli("generate", "--model", str(tiny_model), "--input-format", "jsonl", input="\n")
    assert empty.exit_code == EXIT_FAILURE and "holds no records" in empty.stderr
