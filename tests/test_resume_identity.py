"""--resume continues the same job or refuses: the job record beside --output, and the records
of OpenAI batch jobs (log-probs, per-record length errors, unique ids, repeated custom_ids)."""

from __future__ import annotations

import json
import shutil

import pytest

from nlgen.errors import EXIT_FAILURE, EXIT_USAGE
from nlgen.jobs.jobfile import JobIdentity, ResumableWriter, sidecar_path


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def job(cli, tiny_model, tmp_path):
    """``generate`` of a.txt to out.jsonl: run(*extra, prompts="a.txt") -> the CliRunner result."""
    (tmp_path / "a.txt").write_text("The fox\nAt night\nOnce upon\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("A river\nThe sea\nOnce upon\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"

    def run(*extra, prompts="a.txt", model=str(tiny_model)):
        return cli("generate", "--model", model, "--dtype", "float32", "--greedy", "-n", "3",
                   "-f", str(tmp_path / prompts), "--output", str(out), *extra)

    run.out = out
    return run


def test_another_input_is_refused(job):
    assert job().exit_code == 0
    before = job.out.read_bytes()
    result = job("--resume", prompts="b.txt")
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.startswith(f"Error: --resume: this is not the job that wrote "
                                    f"{job.out}: the input differs (sha256 ")
    assert job.out.read_bytes() == before  # untouched


def test_other_options_and_another_model_are_refused(job, tiny_model, tmp_path):
    assert job().exit_code == 0
    result = job("--resume", "-N", "2", "--num-beams", "2")
    assert result.exit_code == EXIT_USAGE
    assert "the options differ (--num-beams none then, 2 now, " \
           "--num-return-sequences 1 then, 2 now)" in result.stderr
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    result = job("--resume", model=str(other))
    assert result.exit_code == EXIT_USAGE and "the model differs" in result.stderr
    result = job("--resume", "--dtype", "bfloat16")
    assert result.exit_code == EXIT_USAGE and "--dtype float32 then, bfloat16 now" in result.stderr


def test_the_same_job_resumes_and_speed_options_may_change(job):
    assert job().exit_code == 0
    clean = job.out.read_bytes()
    lines = clean.splitlines(keepends=True)
    job.out.write_bytes(b"".join(lines[:1]))  # as if killed after the first record
    result = job("--resume", "-b", "1", "--skip-bad")  # neither defines the job
    assert result.exit_code == 0, result.stderr
    assert job.out.read_bytes() == clean


def test_a_file_without_its_job_record_is_refused(job):
    assert job().exit_code == 0
    sidecar_path(job.out).unlink()
    result = job("--resume")
    assert result.exit_code == EXIT_USAGE and "has no job record" in result.stderr


def test_resume_from_stdin_is_refused(cli, tiny_model, tmp_path):
    out = tmp_path / "out.jsonl"
    result = cli("generate", "--model", str(tiny_model), "-n", "2", "-f", "-", "--output",
                 str(out), "--resume", input="The fox\n")
    assert result.exit_code == EXIT_USAGE
    assert "--resume cannot tell that stdin holds the input" in result.stderr


def test_perplexity_resume_checks_the_job(cli, tiny_model, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("The fox jumps over the dog.\nAt night.\n", encoding="utf-8")
    b.write_text("The fox jumps over the cat.\nAt night.\n", encoding="utf-8")
    out = tmp_path / "ppl.jsonl"
    args = ["perplexity", "--model", str(tiny_model), "--per-line", "--output", str(out)]
    assert cli(*args, str(a)).exit_code == 0
    assert cli(*args, str(a), "--resume", "-b", "1").exit_code == 0
    result = cli(*args, str(b), "--resume")
    assert result.exit_code == EXIT_USAGE and "the input differs" in result.stderr
    result = cli(*args, str(a), "--resume", "--max-length", "16")
    assert result.exit_code == EXIT_USAGE and "--max-length none then, 16 now" in result.stderr


def test_the_identity_is_written_whole_and_names_the_input(tmp_path):
    data = tmp_path / "in.txt"
    data.write_text("x\n", encoding="utf-8")
    identity = JobIdentity("perplexity", None, {"stride": 4}, files=(str(data),), named=True)
    out = tmp_path / "o.jsonl"
    ResumableWriter(out, "input", resume=False, identity=identity.describe()).close()
    kept = json.loads(sidecar_path(out).read_text(encoding="utf-8"))
    assert kept["input"]["bytes"] == 2 and len(kept["job_id"]) == 12
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    renamed = JobIdentity("perplexity", None, {"stride": 4}, files=("./" + str(data),),
                          named=True)
    assert renamed.describe()["input"] != kept["input"]  # perplexity's records name the file


def test_an_output_that_cannot_be_written(cli, tiny_model, tmp_path):
    (tmp_path / "a.txt").write_text("x\n", encoding="utf-8")
    for where, reason in ((tmp_path / "nope" / "out.jsonl", "No such file or directory"),
                          (tmp_path / "a.txt" / "out.jsonl", "Not a directory"),
                          (tmp_path, "Is a directory")):
        for resume in ((), ("--resume",)):
            result = cli("generate", "--model", str(tiny_model), "-f", str(tmp_path / "a.txt"),
                         "--output", str(where), *resume)
            assert result.exit_code == EXIT_FAILURE
            assert result.stderr.startswith(f"Error: cannot write {where}: {reason}")


# ----------------------------------------------------------------------------- OpenAI batches


def request(custom_id, url="/v1/completions", **body):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


@pytest.fixture()
def batch(cli, tiny_model, tmp_path):
    """Write requests to batch.jsonl and run them: batch(requests, *extra) -> result."""
    chat_model = tmp_path / "chat-model"
    shutil.copytree(tiny_model, chat_model)
    (chat_model / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}", encoding="utf-8")
    path = tmp_path / "batch.jsonl"

    def run(requests, *extra):
        path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n"
                                for r in requests), encoding="utf-8")
        return cli("generate", "--model", str(chat_model), "--dtype", "float32", "-f",
                   str(path), *extra)

    return run


def choices(result):
    return [json.loads(line)["response"]["body"]["choices"] for line in
            result.stdout.splitlines()]


def test_logprobs_in_openai_shapes(batch):
    user = [{"role": "user", "content": "hi"}]
    result = batch([request("c", prompt="The fox", max_tokens=3, temperature=0),
                    request("t", "/v1/chat/completions", messages=user, max_tokens=3,
                            temperature=0),
                    request("off", prompt="The fox", max_tokens=3, logprobs=None)],
                   "--logprobs", "2")
    assert result.exit_code == 0, result.stderr
    (completion,), (chat,), (off,) = choices(result)
    lp = completion["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 3
    assert all(len(top) <= 2 for top in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    assert "".join(lp["tokens"]) == completion["text"]
    assert lp["text_offset"][1] == len(lp["tokens"][0])
    content = chat["logprobs"]["content"]
    assert len(content) == 3 and set(content[0]) == {"token", "logprob", "bytes",
                                                     "top_logprobs"}
    assert len(content[0]["top_logprobs"]) == 2
    assert off["logprobs"] is None  # the record's own logprobs: null wins


def test_a_body_asks_for_logprobs_itself(batch):
    user = [{"role": "user", "content": "hi"}]
    result = batch([request("c", prompt="The fox", max_tokens=2, logprobs=1),
                    request("t", "/v1/chat/completions", messages=user, max_tokens=2,
                            logprobs=True, top_logprobs=3),
                    request("p", prompt="The fox", max_tokens=2)], "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    (completion,), (chat,), (plain,) = choices(result)
    assert len(completion["logprobs"]["token_logprobs"]) == 2
    assert len(chat["logprobs"]["content"][0]["top_logprobs"]) == 3
    assert plain["logprobs"] is None
    bad = batch([request("t", "/v1/chat/completions", messages=user, top_logprobs=3)])
    assert bad.exit_code == EXIT_USAGE
    assert "line 1: body.top_logprobs needs body.logprobs: true" in bad.stderr


def test_a_record_longer_than_the_context_is_that_records_error(batch, tmp_path):
    requests = [request("a", prompt="The fox", max_tokens=2),
                request("long", prompt="The dog", max_tokens=9000),
                request("c", prompt="The cat", max_tokens=2)]
    result = batch(requests)
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.startswith(
        f"Error: {tmp_path / 'batch.jsonl'} line 2 (custom_id 'long'): body.max_tokens 9000 "
        "leaves no room for a prompt in the model's 128-token context")
    result = batch(requests, "--skip-bad")
    assert result.exit_code == EXIT_FAILURE
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["response"]["status_code"] for line in lines] == [200, 400, 200]
    error = lines[1]["response"]["body"]["error"]
    assert (lines[1]["line"], error["param"]) == (2, "max_tokens")
    assert error["message"].startswith("line 2 (custom_id 'long'): body.max_tokens 9000")


def test_a_resumed_batch_keeps_its_ids_and_another_job_has_its_own(batch, tmp_path):
    requests = [request("a", prompt="The fox", max_tokens=2), "not json\n",
                request("c", prompt="The cat", max_tokens=2)]
    out = tmp_path / "answers.jsonl"
    assert batch(requests, "--skip-bad", "--output", str(out)).exit_code == EXIT_FAILURE
    first = rows(out)
    assert first[1]["custom_id"] is None and first[1]["line"] == 2  # a line with no custom_id
    out.write_text(json.dumps(first[0]) + "\n", encoding="utf-8")
    assert batch(requests, "--skip-bad", "--output", str(out), "--resume").exit_code == 1
    assert [r["id"] for r in rows(out)] == [r["id"] for r in first]
    again = tmp_path / "again.jsonl"
    assert batch(requests, "--skip-bad", "--output", str(again)).exit_code == EXIT_FAILURE
    assert not {r["id"] for r in rows(again)} & {r["id"] for r in first}
    assert len({r["response"]["request_id"] for r in first + rows(again)}) == 6


def test_a_repeated_custom_id_is_refused_even_with_skip_bad(batch, tmp_path):
    requests = [request("x", prompt="a"), request("y", prompt="b"), request("x", prompt="c")]
    result = batch(requests, "--skip-bad")
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.startswith(f"Error: {tmp_path / 'batch.jsonl'} lines 1 and 3 have "
                                    "the same custom_id 'x'")


def test_logprobs_into_an_output_file_need_no_format_flag(job):
    assert job("--logprobs", "1").exit_code == 0
    assert all(len(r["logprobs"]["content"]) == r["completion_tokens"] for r in rows(job.out))
