"""Edge cases a demanding user meets that need more than one command line to show.

The one-line failures are walked in tests/test_failures.py (docs/failures.md); these need a run
in progress, a terminal, a second process or a look at what is (not) left behind.
"""

from __future__ import annotations

import json
import logging
import os
import pty
import select
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import CORPUS, ROOT

from nlgen.cli.finetune import resume_command
from nlgen.errors import ModelError
from nlgen.models import gguf


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_index_is_the_prompts_position_and_line_its_line(cli, tiny_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("A\n\n  \nB\n", encoding="utf-8")
    result = cli("generate", "-m", str(tiny_model), "--greedy", "-n", "2", "--format", "jsonl",
                 "-f", str(prompts))
    assert [(r["index"], r["line"], r["prompt"]) for r in records(result.stdout)] == [
        (0, 1, "A"), (1, 4, "B")]
    args = cli("generate", "-m", str(tiny_model), "--greedy", "-n", "2", "--format", "jsonl",
               "A", "B")
    assert [(r["index"], "line" in r) for r in records(args.stdout)] == [(0, False), (1, False)]


def test_ctrl_c_while_streaming_ends_the_line(cli, tiny_model, monkeypatch):
    import nlgen.engine.generation

    def interrupted(lm, source, opts, *, stats=None, on_text=None):
        on_text(" and then")
        raise KeyboardInterrupt
        yield  # a generator, as the real one

    monkeypatch.setattr(nlgen.engine.generation, "generate_indexed", interrupted)
    result = cli("generate", "-m", str(tiny_model), "--stream", "Once")
    assert result.exit_code == 130
    assert result.stdout == "Once and then\n"
    assert "Error: interrupted" in result.stderr


def test_quiet_silences_notices_not_errors(cli, tiny_model):
    loud = cli("generate", "-m", str(tiny_model), "--greedy", "-n", "2", "A", input="B\n")
    assert "piped stdin is not read" in loud.stderr
    quiet = cli("generate", "-m", str(tiny_model), "--greedy", "-n", "2", "-q", "A", input="B\n")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    failed = cli("generate", "-m", str(tiny_model), "-q", "--seed", "-1", "A")
    assert failed.exit_code == 2 and failed.stderr.startswith("Error:")


def test_summary_counts_in_words(cli, tiny_model):
    result = cli("generate", "-m", str(tiny_model), "--greedy", "-n", "1", "--verbose", "A")
    assert "1 token in" in result.stderr and "(1 sequence," in result.stderr


def test_empty_stdin_is_refused_before_the_model_loads(cli, monkeypatch):
    import nlgen.models.loading

    def no_load(*a, **k):
        raise AssertionError("the model must not load for an empty input")

    monkeypatch.setattr(nlgen.models.loading, "load_model", no_load)
    for command in (["perplexity"], ["perplexity", "--per-line"], ["generate"]):
        result = cli(*command, input="\n \n")
        assert result.exit_code == 1, result.stderr
        assert result.stderr.startswith("Error: no"), result.stderr


def test_resume_command_drops_overwrite():
    assert resume_command("nlgen finetune a.txt --overwrite -o 'my model'") == (
        "nlgen finetune a.txt -o 'my model' --resume")
    assert resume_command("nlgen finetune a.txt --resume") == "nlgen finetune a.txt --resume"


def test_resume_refuses_settings_that_change_the_checkpoint(tiny_model, tmp_path, cli):
    import signal

    from nlgen import finetune

    out = tmp_path / "m"
    opts = finetune.FinetuneOptions(data=(str(CORPUS),), model=str(tiny_model),
                                    output_dir=str(out), max_steps=4, block_size=32, seed=1)

    def interrupt_at_2(event) -> None:
        if isinstance(event, finetune.StepProgress) and event.step == 2 and not event.logged:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(finetune.TrainingInterrupted):
        finetune.finetune(opts, on_event=interrupt_at_2)
    base = ["finetune", str(CORPUS), "-m", str(tiny_model), "-o", str(out), "--max-steps", "4",
            "--seed", "1", "--resume"]
    changed = cli(*base, "--block-size", "16", "--learning-rate", "1e-3")
    assert changed.exit_code == 2, changed.stderr
    assert changed.stderr.startswith("Error: --resume with settings that differ")
    assert "--block-size 32 then, 16 now" in changed.stderr
    assert "--learning-rate None then, 0.001 now" in changed.stderr
    same = cli(*base, "--block-size", "32")
    assert same.exit_code == 0, same.stderr
    record = json.loads((out / "nlgen_run.json").read_text(encoding="utf-8"))
    assert record["resumed_from_step"] == 2
    assert record["hyperparameters"]["block_size"] == 32


def test_a_second_process_says_it_waits_for_a_conversion(tmp_path, monkeypatch, caplog):
    from filelock import FileLock

    monkeypatch.setenv("NLGEN_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF but nothing else")
    target = gguf.cache_path(model)
    target.parent.mkdir(parents=True)
    lock = FileLock(str(target) + ".lock")
    lock.acquire()
    failure: list[BaseException] = []

    def convert() -> None:
        try:
            gguf.converted_dir(model)
        except ModelError as exc:
            failure.append(exc)

    with caplog.at_level(logging.WARNING, logger="nlgen"):
        worker = threading.Thread(target=convert)
        worker.start()
        worker.join(2)
        assert worker.is_alive()  # blocked on the lock ...
        assert "waiting for another nlgen process" in caplog.text  # ... and it says so
        lock.release()
        worker.join(60)
    assert failure and "cannot read GGUF file" in str(failure[0])


def test_a_file_that_is_not_gguf_fails_at_once_and_leaves_nothing(tmp_path, monkeypatch,
                                                                   caplog):
    monkeypatch.setenv("NLGEN_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "x.gguf"
    model.write_bytes(b"random bytes")
    with caplog.at_level(logging.WARNING, logger="nlgen"), pytest.raises(ModelError):
        gguf.converted_dir(model)
    assert "converting" not in caplog.text
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.lock"))


def _on_a_terminal(args: list[str], env: dict[str, str]) -> bytes:
    """Run nlgen with its stdout on a pseudo-terminal; what it printed there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "nlgen", *args], stdout=slave,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, **env, "TERM": "xterm-256color", "COLUMNS": "120"})
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(60)
    os.close(master)
    return out


def test_no_color_means_no_escape_codes_on_a_terminal(tiny_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[:2000], encoding="utf-8")
    args = ["perplexity", "-m", str(tiny_model), str(text)]
    styled = _on_a_terminal(args, {"NO_COLOR": ""})
    plain = _on_a_terminal(args, {"NO_COLOR": "1"})
    assert b"Perplexity" in styled and b"\x1b[" in styled  # the check can fail
    assert b"Perplexity" in plain and b"\x1b[" not in plain


@pytest.mark.parametrize("bad", ["--overwrite", None])
def test_printed_resume_command_is_accepted(bad, tiny_model, tmp_path, cli):
    """What Ctrl-C prints parses as a valid command (its options are all accepted)."""
    out = Path(tmp_path) / "o"
    command = f"nlgen finetune {CORPUS} -m {tiny_model} -o {out} --max-steps 1"
    if bad:
        command += f" {bad}"
    args = resume_command(command).split()[1:]
    result = cli(*args)
    # Nothing to resume in this fresh folder: the input error, not a usage error (exit 2).
    assert result.exit_code == 1 and "no checkpoint to resume from" in result.stderr
