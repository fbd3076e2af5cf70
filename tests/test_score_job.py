"""`score` as a job: under torchrun / accelerate launch the same records as one process (to the
bit, in float32), --output / --resume after a kill or a cut file, the job's identity; and
--reference under the launchers for score and perplexity. Launched runs use two CPU processes.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import CORPUS, build_tiny_gpt2, kill_after, run_nlgen
from test_parallel import launch, rows

from nlgen.errors import EXIT_FAILURE, EXIT_USAGE
from nlgen.jobs.jobfile import sidecar_path

WORDS = CORPUS.read_text(encoding="utf-8").split()


def records(n: int) -> list[dict]:
    """Completions, and multiple choices with and without a label, of unequal lengths."""
    out: list[dict] = []
    for i in range(n):
        prompt = " ".join(WORDS[i * 3 % 500:i * 3 % 500 + 2 + i % 7])
        if i % 3 == 0:
            out.append({"prompt": prompt, "completion": " " + " ".join(WORDS[i:i + 1 + i % 4])})
            continue
        choices = [" " + WORDS[(i * 5 + k) % len(WORDS)] for k in range(2 + i % 3)]
        record = {"prompt": prompt, "choices": choices, "id": f"r{i}"}
        if i % 5:
            record["label"] = i % len(choices)
        out.append(record)
    return out


def write(path: Path, rows_: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows_),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 records: at -b 2 or 3 several read-ahead groups, so both ranks score some."""
    return write(tmp_path_factory.mktemp("score-job") / "records.jsonl", records(40))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A second tiny GPT-2: other weights, the same tokenizer."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-seed1"), seed=1)


def alone(*args: str) -> subprocess.CompletedProcess:
    """``nlgen ARGS`` in one process with one thread, as each process of :func:`launch` runs:
    float32 sums can round otherwise with another number of threads."""
    proc = run_nlgen(*args, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def cut(clean: Path, out: Path, keep: int, torn: bool = True) -> None:
    """``out``: the first ``keep`` records of ``clean`` (and half the next), with its job
    record, as a job interrupted there leaves them."""
    lines = clean.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:keep]) + (lines[keep][:40] if torn and keep < len(lines)
                                              else b""))
    if out != clean:
        shutil.copy(sidecar_path(clean), sidecar_path(out))


# ----------------------------------------------------------------------------- one process


def test_output_holds_the_stdout_records_keyed_by_index(cli, tiny_model, corpus, tmp_path):
    args = ["score", "--model", str(tiny_model), "-b", "2", str(corpus)]
    shown = cli(*args)
    assert shown.exit_code == 0, shown.stderr
    out = tmp_path / "out.jsonl"
    written = cli(*args, "--output", str(out))
    assert written.exit_code == 0, written.stderr
    assert written.stdout == ""
    assert [json.loads(line) for line in shown.stdout.splitlines()] == rows(out)
    assert [r["index"] for r in rows(out)] == list(range(40))
    assert rows(out)[1]["id"] == "r1"  # the input's fields come back after the index
    # the closing line counts the file: the same accuracy as stdout's run
    accuracy = shown.stderr.strip().removeprefix("nlgen: ")
    assert f"{out}: 40 records; {accuracy}" in written.stderr


@pytest.mark.parametrize("keep", [0, 5, 23, 40])
def test_resume_of_a_cut_file_is_the_clean_file(cli, tiny_model, corpus, tmp_path, keep):
    """Cut anywhere (a torn last line too): --resume writes what is missing, once, in order,
    and in the batches of the first run, so the file is the clean one byte for byte."""
    args = ["score", "--model", str(tiny_model), "-b", "2", str(corpus), "--output"]
    clean = tmp_path / "clean.jsonl"
    assert cli(*args, str(clean)).exit_code == 0
    out = tmp_path / "out.jsonl"
    cut(clean, out, keep)
    resumed = cli(*args, str(out), "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert out.read_bytes() == clean.read_bytes()
    earlier = f", {keep} from the resumed run" if keep else ""
    assert f"{out}: 40 records{earlier}; acc " in resumed.stderr


def test_bad_records_are_not_written_and_are_retried(cli, tiny_model, tmp_path):
    path = write(tmp_path / "r.jsonl", [*records(4), "{not json", {"prompt": "x"},
                                        *records(3)])
    out = tmp_path / "out.jsonl"
    args = ["score", "--model", str(tiny_model), "-b", "1", str(path), "--output", str(out)]
    first = cli(*args)
    assert first.exit_code == EXIT_FAILURE
    assert first.stderr.count("Error:") == 3  # two records, and the count of them
    assert [r["index"] for r in rows(out)] == [0, 1, 2, 3, 6, 7, 8]
    before = out.read_bytes()
    again = cli(*args, "--resume")
    assert again.exit_code == EXIT_FAILURE
    assert f"{path}:5: " in again.stderr and "2 of 2 records could not be scored" in again.stderr
    assert out.read_bytes() == before


@pytest.mark.slow
def test_a_killed_score_job_resumes_to_the_clean_result(cli, tiny_model, tmp_path):
    path = write(tmp_path / "r.jsonl", records(300))
    args = ["score", "--model", str(tiny_model), "-b", "1", str(path), "--output"]
    clean = tmp_path / "clean.jsonl"
    alone(*args, str(clean))
    out = tmp_path / "out.jsonl"
    assert 10 <= kill_after(args, out, 10).count(b"\n") < 300, "the job was not killed halfway"
    alone(*args, str(out), "--resume")
    assert out.read_bytes() == clean.read_bytes()  # every record once, in input order


def test_resume_continues_the_same_job_or_refuses(cli, tiny_model, other_model, corpus,
                                                  tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["score", "--model", str(tiny_model), str(corpus), "--output", str(out)]
    assert cli(*args).exit_code == 0
    for extra, message in [
        (["--prompt-field", "id"], "the options differ (--prompt-field prompt then, id now)"),
        (["--reference", str(other_model)], f"--reference none then, {other_model} now"),
        (["--tokens"], "--tokens false then, true now"),
        (["--text"], "--text false then, true now"),
    ]:
        result = cli(*args, "--resume", *extra)
        assert result.exit_code == EXIT_USAGE, (extra, result.stderr)
        assert message in result.stderr
    assert cli(*args, "--resume", "-b", "5").exit_code == 0  # the batch size changes no record
    other = tmp_path / "other.jsonl"
    assert cli("perplexity", "--model", str(tiny_model), str(CORPUS), "--output",
               str(other)).exit_code == 0
    result = cli("score", "--model", str(tiny_model), str(corpus), "--output", str(other),
                 "--resume")
    assert result.exit_code == EXIT_USAGE and "the command differs" in result.stderr
    result = cli("score", "--model", str(tiny_model), str(corpus), "--resume")
    assert result.exit_code == EXIT_USAGE and "--resume continues a job" in result.stderr


def test_stdin_is_refused_under_several_processes(cli, tiny_model):
    result = cli("score", "--model", str(tiny_model), input=json.dumps(records(1)[0]) + "\n",
                 env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert result.exit_code == EXIT_USAGE
    assert "stdin cannot feed 2 processes" in result.stderr


# ----------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_processes_give_one_process_records_and_totals(tiny_model, corpus):
    """--format json: every record (logprobs, preds, accs) and the summary (acc, acc_norm,
    acc_bytes and their standard errors) equal to the bit; -b 3 makes batches that pad."""
    args = ["score", "--model", str(tiny_model), "--dtype", "float32", "-b", "3", "--format",
            "json", str(corpus)]
    one = alone(*args).stdout.decode()
    two = launch(*args).stdout
    assert json.loads(two) == json.loads(one)
    assert two == one
    assert json.loads(one)["summary"]["labelled"] > 10


@pytest.mark.slow
def test_reference_output_and_resume_under_the_launchers(tiny_model, other_model, corpus,
                                                         tmp_path):
    args = ["score", "--model", str(tiny_model), "--reference", str(other_model), "-b", "2",
            str(corpus), "--output"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    alone(*args, str(one))
    launch(*args, str(two))
    assert two.read_bytes() == one.read_bytes()
    assert all("reference_logprob" in r or "reference_logprobs" in r for r in rows(two))
    cut(two, two, 7)  # the launched job stopped there
    resumed = launch(*args, str(two), "--resume", launcher="accelerate")
    assert "7 from the resumed run" in resumed.stderr
    assert two.read_bytes() == one.read_bytes()


@pytest.mark.slow
def test_perplexity_reference_under_torchrun(cli, tiny_model, other_model, tmp_path):
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines[:20]) + "\n", encoding="utf-8")
    args = ["perplexity", "--model", str(tiny_model), "--reference", str(other_model),
            "--max-length", "32", "--stride", "24", "--per-line", str(path), "--output"]
    assert cli(*args, str(tmp_path / "one.jsonl")).exit_code == 0
    launch(*args, str(tmp_path / "two.jsonl"))
    one, two = rows(tmp_path / "one.jsonl"), rows(tmp_path / "two.jsonl")
    assert [(r["line"], r["tokens"]) for r in one] == [(r["line"], r["tokens"]) for r in two]
    assert max(r["method"]["windows"] for r in one) > 1  # a line's windows on both ranks
    for a, b in zip(one, two, strict=True):
        assert a["reference_model"] == b["reference_model"]
        for key in ("perplexity", "reference_perplexity", "perplexity_ratio", "kl",
                    "top1_agreement"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6), (key, a[key], b[key])
