"""`nlgen generate` through the real CLI: CliRunner in-process, and real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_nlgen

from nlgen.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE

JSONL_KEYS = {"index", "sequence", "prompt", "completion", "text", "model", "prompt_tokens",
              "completion_tokens", "finish_reason"}


@pytest.fixture()
def gen(cli, tiny_model):
    """Run `nlgen generate` on the tiny model, greedy and short unless told otherwise."""

    def invoke(*args: str, input=None, greedy=True, env=None, n="6"):
        base = ["generate", "--model", str(tiny_model)] + (["-n", n] if n else [])
        if greedy:
            base.append("--greedy")
        return cli(*base, *args, input=input, env=env)

    return invoke


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# ----------------------------------------------------------------------------- inputs


def test_one_prompt_argument_prints_prompt_and_continuation(gen):
    result = gen("Once upon a time")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("Once upon a time")
    assert result.stdout.endswith("\n") and result.stdout.count("---") == 0


def test_completion_only(gen):
    full = gen("The fox").stdout
    only = gen("--completion-only", "The fox").stdout
    assert full == "The fox" + only


def test_several_arguments_are_separated(gen):
    result = gen("The fox", "At night")
    lines = result.stdout.split("\n---\n")
    assert len(lines) == 2
    assert lines[0].startswith("The fox") and lines[1].startswith("At night")


def test_null_separated_output(gen):
    result = gen("--null", "The fox", "At night")
    parts = result.stdout.split("\0")
    assert parts[-1] == "" and len(parts) == 3
    assert parts[0].startswith("The fox") and parts[1].startswith("At night")


def test_stdin_one_prompt_per_line_in_order(gen):
    result = gen("--format", "jsonl", input="The fox\n\nAt night\nx\n")
    out = records(result.stdout)
    assert [r["prompt"] for r in out] == ["The fox", "At night", "x"]  # blank lines skipped
    assert [r["index"] for r in out] == [0, 1, 2]


def test_file_option_and_dash(gen, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("The fox\r\nAt night\n", encoding="utf-8")
    from_file = records(gen("--format", "jsonl", "--file", str(path)).stdout)
    from_stdin = records(gen("--format", "jsonl", "--file", "-",
                             input=path.read_bytes()).stdout)
    assert [r["prompt"] for r in from_file] == ["The fox", "At night"]
    assert from_file == from_stdin


def test_whole_input_is_one_prompt(gen):
    out = records(gen("--whole", "--format", "jsonl", input="The fox\nAt night\n").stdout)
    assert len(out) == 1 and out[0]["prompt"] == "The fox\nAt night"


def test_arguments_win_over_piped_stdin_and_say_so(gen):
    result = gen("The fox", input="ignored\n")
    assert result.exit_code == 0
    assert result.stdout.startswith("The fox")
    assert "piped stdin is not read" in result.stderr


def test_empty_input_prints_nothing_and_exits_1(gen):
    # One rule for every command (README, "Exit codes"): an input with nothing in it fails.
    result = gen(input="\n  \n")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "Error: no prompts in the input" in result.stderr


def test_non_utf8_input_is_one_line_error(gen):
    result = gen(input=b"The fox\n\xff\xfe bad\n")
    assert result.exit_code == EXIT_FAILURE
    assert "line 2 is not valid UTF-8" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("The fox")  # the good line before it was still generated


def test_missing_file(gen, tmp_path):
    result = gen("--file", str(tmp_path / "nope.txt"))
    assert result.exit_code == EXIT_FAILURE
    assert "file not found" in result.stderr


def test_prompts_and_file_together_is_a_usage_error(gen, tmp_path):
    result = gen("--file", "x.txt", "The fox")
    assert result.exit_code == EXIT_USAGE


# ----------------------------------------------------------------------------- outputs


def test_jsonl_schema(gen):
    result = gen("--format", "jsonl", "-N", "2", "--num-beams", "2", "The fox", "At night",
                 greedy=False)
    out = records(result.stdout)
    assert len(out) == 4
    for r in out:
        assert set(r) == JSONL_KEYS
        assert r["text"] == r["prompt"] + r["completion"]
        assert r["finish_reason"] in {"eos", "stop", "length", "time"}
        assert r["completion_tokens"] <= 6 and r["prompt_tokens"] > 0
    assert [(r["index"], r["sequence"]) for r in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_stop_and_max_length_through_the_cli(gen):
    full = records(gen("--format", "jsonl", "The fox").stdout)[0]["completion"]
    stop = full[3:5]
    cut = records(gen("--format", "jsonl", "--stop", stop, "--stop", "\u2603",
                      "The fox").stdout)[0]
    assert cut["completion"] == full[: full.find(stop)] and cut["finish_reason"] == "stop"
    total = records(gen("--format", "jsonl", "--max-length", "12", "The fox", n=None).stdout)[0]
    assert total["prompt_tokens"] + total["completion_tokens"] == 12


def test_forced_stream_equals_batch_output(gen):
    assert gen("--stream", "The river").stdout == gen("--no-stream", "The river").stdout


def test_seed_makes_sampling_reproducible(gen):
    a = gen("--seed", "3", "-N", "2", "The fox", greedy=False).stdout
    b = gen("--seed", "3", "-N", "2", "The fox", greedy=False).stdout
    assert a == b


def test_batch_size_does_not_change_greedy_output(gen):
    prompts = "The fox\nAt night\nOnce upon a time there was a little\nx\n"
    one = gen("--batch-size", "1", "--format", "jsonl", input=prompts).stdout
    four = gen("--batch-size", "4", "--format", "jsonl", input=prompts).stdout
    assert one == four


def test_option_passthrough_takes_effect(gen, tiny_lm):
    plain = records(gen("--format", "jsonl", "-n", "1", "The fox").stdout)[0]["completion"]
    [first] = tiny_lm.tokenizer(plain, add_special_tokens=False)["input_ids"][:1]
    banned = gen("--format", "jsonl", "-n", "1", "-o", f"bad_words_ids=[[{first}]]", "The fox")
    assert banned.exit_code == 0, banned.stderr
    completion = records(banned.stdout)[0]["completion"]
    assert completion and completion != plain  # the banned greedy token was not chosen
    sampled = gen("-o", "epsilon_cutoff=0.0003", "--format", "jsonl", "The fox", greedy=False)
    assert sampled.exit_code == 0, sampled.stderr


def test_verbose_prints_a_summary_on_stderr_only(gen):
    result = gen("--verbose", "The fox")
    assert "tokens/s" in result.stderr
    assert "tokens/s" not in result.stdout


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or more"),
    (["--top-p", "2"], "--top-p must be in"),
    (["-n", "0"], "--max-new-tokens must be at least 1"),
    (["--format", "xml"], "Invalid value for '--format'"),
    (["--device", "tpu"], "invalid --device"),
    (["--dtype", "int3"], "Invalid value for '--dtype'"),
    (["-o", "no_such_option=1"], "unknown generation option"),
    (["-o", "repetition_penalt=1.1"], "repetition_penalty"),
    (["--greedy", "--top-k", "5"], "--greedy does not sample"),
    (["--top-k", "many"], "Invalid value"),
    (["--no-such-flag"], "No such option"),
])
def test_usage_errors_exit_2_before_the_model_loads(cli, monkeypatch, args, message):
    import nlgen.models.loading

    def no_load(*a, **k):
        raise AssertionError("the model must not load for a usage error")

    monkeypatch.setattr(nlgen.models.loading, "load_model", no_load)
    result = cli("generate", *args, "The fox")
    assert result.exit_code == EXIT_USAGE
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_no_prompt_on_a_terminal_is_a_usage_error(cli, monkeypatch):
    monkeypatch.setattr("nlgen.inputs.stdin_is_terminal", lambda: True)
    result = cli("generate")
    assert result.exit_code == EXIT_USAGE
    assert "no prompt given" in result.stderr


def test_missing_model_directory(cli, tmp_path):
    result = cli("generate", "--model", str(tmp_path / "missing"), "hi")
    assert result.exit_code == EXIT_FAILURE
    assert "model directory not found" in result.stderr


def test_directory_without_a_model(cli, tmp_path):
    result = cli("generate", "--model", str(tmp_path), "hi")
    assert result.exit_code == EXIT_FAILURE
    assert "holds no model" in result.stderr


def test_explicit_hub_model_offline_fails_clearly(cli):
    result = cli("generate", "--model", "gpt2", "hi")
    assert result.exit_code == EXIT_FAILURE
    assert "not in the local cache and HF_HUB_OFFLINE is set" in result.stderr
    assert "--model builtin" in result.stderr


def test_model_from_environment_variable(cli, tiny_model):
    result = cli("generate", "--greedy", "-n", "3", "--format", "jsonl", "The fox",
                 env={"NLGEN_MODEL": str(tiny_model)})
    assert records(result.stdout)[0]["model"] == str(tiny_model)


def test_prompt_too_long_with_no_truncate(gen):
    result = gen("--no-truncate", "word " * 300)
    assert result.exit_code == EXIT_FAILURE
    assert "context" in result.stderr


def test_chat_without_template(gen):
    result = gen("--chat", "hi")
    assert result.exit_code == EXIT_FAILURE
    assert "no chat template" in result.stderr


def test_unexpected_errors_are_one_line_with_a_debug_hint(cli, monkeypatch, tiny_model):
    import nlgen.engine.generation

    def boom(*a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(nlgen.engine.generation, "generate_indexed", boom)
    result = cli("generate", "--model", str(tiny_model), "hi")
    assert result.exit_code == EXIT_FAILURE
    assert "unexpected RuntimeError: kaput" in result.stderr and "NLGEN_DEBUG=1" in result.stderr
    with pytest.raises(RuntimeError):
        cli("generate", "--model", str(tiny_model), "hi", env={"NLGEN_DEBUG": "1"})


# ----------------------------------------------------------------------------- real processes


def test_python_dash_m_version():
    result = run_nlgen("--version")
    assert result.returncode == 0 and result.stdout.decode().startswith("nlgen ")


def test_subprocess_pipeline_jsonl(tiny_model):
    result = run_nlgen("generate", "--model", str(tiny_model), "--greedy", "-n", "4",
                       "--format", "jsonl", input="The fox\nAt night\n")
    assert result.returncode == 0, result.stderr
    out = records(result.stdout.decode())
    assert [r["prompt"] for r in out] == ["The fox", "At night"]
    assert result.stderr == b""  # not a terminal, not verbose: nothing to say


def test_closed_pipe_ends_quietly(tiny_model):
    prompts = "".join(f"prompt number {i}\n" for i in range(200))
    cmd = (f"{sys.executable} -m nlgen generate --model {tiny_model} -n 4 --greedy "
           f"--batch-size 2 | head -n 1")
    result = subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], input=prompts.encode(),
                            capture_output=True, cwd=ROOT, env=os.environ.copy())
    assert result.stdout.decode().startswith("prompt number 0")
    assert b"Traceback" not in result.stderr and b"BrokenPipe" not in result.stderr
    assert result.stderr == b""
    assert result.returncode == 0


def test_ctrl_c_exits_130_with_output_intact(tiny_model):
    # A terminal's foreground job gets Ctrl-C; a background one (`cmd &` in a script, as some
    # CI runners start the tests) inherits SIGINT ignored, and a child keeps ignoring it. Start
    # the child as the foreground job it stands for: this process's own handler is not
    # inherited, so the child starts with the default one.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nlgen", "generate", "--model", str(tiny_model), "-n", "20",
             "--batch-size", "1", "--format", "jsonl"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert proc.stdin and proc.stdout
    # Feed prompts slowly so the process is busy when the interrupt arrives.
    proc.stdin.write(b"".join(b"The fox %d\n" % i for i in range(3)))
    proc.stdin.flush()
    first = proc.stdout.readline()
    assert json.loads(first)["prompt"] == "The fox 0"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED
    assert b"interrupted" in err and b"Traceback" not in err
    for line in out.splitlines():  # whatever else was printed is whole
        json.loads(line)


# ----------------------------------------------------------------------------- the built-in model


@pytest.mark.slow
def test_builtin_once_upon_a_time_subprocess():
    result = run_nlgen("generate", "--model", "builtin", "--seed", "0", "-n", "30",
                       "Once upon a time")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert text.startswith("Once upon a time")
    words = text.lower().split()
    common = {"the", "a", "and", "of", "to", "was", "in", "there", "upon", "time", "once"}
    assert len(words) >= 15 and len(common & set(words)) >= 4


@pytest.mark.slow
def test_builtin_second_load_is_a_cache_hit(monkeypatch):
    from nlgen.models import gguf, loading, spec

    first = loading.load_model("builtin", device="cpu")
    converted = gguf.cache_path(spec.builtin_gguf_path())
    assert (converted / "model.safetensors").is_file()

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        _refuse_gguf(transformers.AutoModelForCausalLM.from_pretrained))
    started = time.perf_counter()
    second = loading.load_model("builtin", device="cpu")
    assert time.perf_counter() - started < 15  # generous: ~3 s measured; conversion takes 20+
    assert second.source == first.source == str(converted)
    assert first.tokenizer.bos_token is None or not first.tokenizer("hi")["input_ids"][0] == \
        first.tokenizer.bos_token_id


def _refuse_gguf(original):
    def wrapper(*args, **kwargs):
        if "gguf_file" in kwargs:
            raise AssertionError("the GGUF must not be converted again")
        return original(*args, **kwargs)

    return wrapper


@pytest.mark.slow
def test_default_model_falls_back_to_builtin_with_a_notice(cli):
    # HF_HUB_OFFLINE unset: the Hub probe fails (no network here) and the default falls back.
    result = cli("generate", "-n", "5", "--greedy", "Hello", env={"HF_HUB_OFFLINE": None})
    assert result.exit_code == 0, result.stderr
    assert "using the built-in model" in result.stderr
    assert result.stdout.startswith("Hello")


@pytest.mark.slow
def test_builtin_chat_prints_the_reply_only(cli):
    result = cli("generate", "--model", "builtin", "--chat", "--greedy", "-n", "12",
                 "--format", "jsonl", "What is the capital of France?")
    [record] = records(result.stdout)
    assert record["prompt"] == "What is the capital of France?"
    assert "Paris" in record["completion"]
    assert "<|im_start|>" not in record["completion"]
