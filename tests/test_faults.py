"""Faults from outside: a full disk, a kill, SIGTERM, a lost rank, a half-copied model.

Each one ends in one line on stderr and a documented exit code, and leaves nothing behind that
looks like a model, a checkpoint or a cache entry. A full disk is simulated (an OSError with
ENOSPC where the write happens, or /dev/full for stdout): mounting a small file system needs
root. The cases that a docs/failures.md row can express are rows there; these need more.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import CORPUS, ROOT

from nlgen.errors import OutputError
from nlgen.jobs import distributed
from nlgen.models import gguf

FULL = OSError(errno.ENOSPC, "No space left on device")
TRAIN = ("--max-steps", "2", "--block-size", "32", "--logging-steps", "1", "--seed", "0")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_error(stderr: str, start: str) -> None:
    assert stderr.startswith(start), stderr
    assert stderr.count("Error:") == 1, stderr
    assert "Traceback" not in stderr and "bug in nlgen" not in stderr, stderr


# ---------------------------------------------------------------------- stdout on a full disk


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "t.txt").write_text(CORPUS.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    (folder / "r.jsonl").write_text('{"prompt": "The", "completion": " fox"}\n',
                                    encoding="utf-8")
    return folder


FULL_STDOUT_CASES = [
    ("generate", "-n", "3", "A"),
    ("generate", "-n", "3", "--format", "jsonl", "A"),
    ("generate", "-n", "3", "--stream", "A"),
    ("perplexity", "TEXT"),
    ("perplexity", "--format", "jsonl", "TEXT"),
    ("score", "RECORDS"),
    ("models",),
    ("models", "--format", "jsonl"),
    ("models", "--format", "table"),
    ("--help",),
    ("--version",),
]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
@pytest.mark.parametrize("args", FULL_STDOUT_CASES, ids=" ".join)
def test_a_full_stdout_is_one_line_and_exit_1(args, inputs, tiny_model):
    files = {"TEXT": str(inputs / "t.txt"), "RECORDS": str(inputs / "r.jsonl")}
    words = [files.get(w, w) for w in args]
    if words[0] in ("generate", "perplexity", "score"):
        words[1:1] = ["-m", str(tiny_model)]
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "nlgen", *words], stdout=full,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT,
                              timeout=300)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, stderr
    lines = [line for line in stderr.splitlines() if not line.startswith("nlgen:")]
    assert lines == ["Error: cannot write to stdout: No space left on device"], stderr


def test_help_into_a_closed_pipe_exits_0():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    try:
        proc = subprocess.run([sys.executable, "-m", "nlgen", "generate", "--help"],
                              stdout=write, stderr=subprocess.PIPE, cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr


def test_help_honours_no_color_on_a_terminal():
    from test_hardening import _on_a_terminal

    styled = _on_a_terminal(["generate", "--help"], {"NO_COLOR": ""})
    plain = _on_a_terminal(["generate", "--help"], {"NO_COLOR": "1"})
    assert b"Usage:" in styled and b"\x1b[" in styled  # the check can fail
    assert b"nlgen generate [OPTIONS]" in plain and b"\x1b[" not in plain  # no bold, no dim


# ---------------------------------------------------------------------- models and the cache


def test_a_model_directory_without_a_tokenizer_names_the_files(tiny_model, tmp_path, cli,
                                                               monkeypatch):
    for name, keep in (("bare", ()), ("half", ("tokenizer_config.json",))):
        folder = tmp_path / name
        folder.mkdir()
        for file in ("config.json", "generation_config.json", "model.safetensors", *keep):
            shutil.copy(tiny_model / file, folder / file)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("nlgen.inputs.stdin_has_input", lambda: False)
    for name in ("bare", "half"):
        result = cli("generate", "-m", name, "-n", "2", "A")
        assert result.exit_code == 1
        one_error(result.stderr, f"Error: {name}/ has no tokenizer (tokenizer.json, or "
                  "vocab.json + merges.txt, or tokenizer.model)")


def test_offline_message_names_the_variable_that_is_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["TRANSFORMERS_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-m", "nlgen", "generate", "-m", "gpt2", "x"],
                          capture_output=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1
    one_error(proc.stderr.decode(), "Error: model 'gpt2' is not in the local cache and "
              "TRANSFORMERS_OFFLINE is set")


@pytest.fixture()
def fake_gguf(tmp_path, tiny_model, monkeypatch):
    """A .gguf file whose "conversion" loads the tiny model (transformers' GGUF reader is
    bypassed); the cache under tmp_path."""
    import transformers

    monkeypatch.setenv("NLGEN_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tokenizer = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: real_model(str(tiny_model)))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: real_tokenizer(str(tiny_model)))
    return model


def test_a_full_cache_is_one_error_and_leaves_no_entry(fake_gguf, monkeypatch):
    from transformers import PreTrainedModel

    def save_half(self, directory, **kwargs):
        (Path(directory) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_half)
    with pytest.raises(OutputError) as info:
        gguf.converted_dir(fake_gguf)
    assert info.value.message.startswith("cannot write the model cache at ")
    assert info.value.message.endswith(": No space left on device")
    converted = gguf.cache_dir() / "converted"
    assert [p.suffix for p in converted.iterdir()] == [".lock"]  # no entry, no temporary


def test_a_killed_conversions_temporaries_are_removed(fake_gguf):
    converted = gguf.cache_dir() / "converted"
    converted.mkdir(parents=True)
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    entry = gguf.cache_path(fake_gguf).name
    stale = [converted / f"other-0123.tmp-{host}-{dead.pid}-abc",  # its process is gone
             converted / f"{entry}.tmp-elsewhere-1-abc"]  # ours: we hold its lock
    live = converted / f"other-0123.tmp-{host}-{os.getpid()}-abc"  # a conversion under way
    for folder in (*stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(bytes(100))
    target = gguf.converted_dir(fake_gguf)
    assert (target / "config.json").is_file()
    assert not any(p.exists() for p in stale) and live.exists()
    # The entry is a folder like any other: the umask decides, not mkdtemp's 0700 or
    # safetensors' 0600.
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask()
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o666 & ~umask()
    # Once the entry is converted, no process converts it: a later load clears what is left
    # (here: an older nlgen's temporary, which names no process).
    leftover = converted / f"{entry}.tmp-k2j4x9"
    leftover.mkdir()
    assert gguf.converted_dir(fake_gguf) == target
    assert not leftover.exists() and live.exists()


# ---------------------------------------------------------------------- finetune on a full disk


def test_a_full_disk_at_the_final_save_leaves_nothing(tiny_model, tmp_path, cli, monkeypatch):
    from transformers import Trainer

    def save_half(self, output_dir=None, _internal_call=False):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "config.json").write_text("{}")
        raise FULL

    monkeypatch.setattr(Trainer, "save_model", save_half)
    out = tmp_path / "out"
    result = cli("finetune", str(CORPUS), "-m", str(tiny_model), "-o", str(out), "-q", *TRAIN)
    assert result.exit_code == 1
    one_error(result.stderr, f"Error: cannot write the model to {out}: No space left on device")
    assert "Hint: free some space, then run again" in result.stderr
    assert leftovers(tmp_path) == []  # no .out.partial, no out.checkpoints


@pytest.mark.parametrize("fail_at", [2, 4])
def test_a_full_disk_at_a_checkpoint_leaves_only_whole_ones(fail_at, tiny_model, tmp_path, cli,
                                                            monkeypatch):
    from transformers import Trainer

    real = Trainer._save_rng_state

    def full_at(self, output_dir):  # after the weights and the optimizer, before the state
        if self.state.global_step == fail_at:
            raise FULL
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", full_at)
    out = tmp_path / "out"
    args = ("finetune", str(CORPUS), "-m", str(tiny_model), "-o", str(out), "--max-steps", "6",
            "--save-steps", "2", "--block-size", "32", "--seed", "0", "-q")
    result = cli(*args)
    assert result.exit_code == 1
    one_error(result.stderr, f"Error: cannot save checkpoint-{fail_at} in {out}.checkpoints: "
              "No space left on device")
    if fail_at == 2:  # nothing worth keeping
        assert "then run again" in result.stderr
        assert leftovers(tmp_path) == []
        return
    assert "then rerun with --resume (from step 2)" in result.stderr
    assert [p.name for p in (tmp_path / "out.checkpoints").glob("checkpoint-*")] == [
        "checkpoint-2"]
    monkeypatch.setattr(Trainer, "_save_rng_state", real)  # space was freed
    resumed = cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads((out / "nlgen_run.json").read_text())["resumed_from_step"] == 2


def test_torchs_silent_write_error_on_a_full_disk_is_named(tiny_model, tmp_path, cli,
                                                           monkeypatch):
    """torch's archive writer says "unexpected pos ..." on a full disk: the free space says
    what happened."""
    from transformers import Trainer

    def full(self, output_dir):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 58112 "
                           "vs 58000")

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full)
    monkeypatch.setattr("nlgen.errors.disk_full", lambda path: True)
    out = tmp_path / "out"
    result = cli("finetune", str(CORPUS), "-m", str(tiny_model), "-o", str(out), "-q",
                 "--max-steps", "4", "--save-steps", "2", "--block-size", "32")
    assert result.exit_code == 1
    one_error(result.stderr, f"Error: cannot save checkpoint-2 in {out}.checkpoints: No space "
              "left on device")
    assert leftovers(tmp_path) == []


def test_half_written_checkpoints_are_not_checkpoints(tmp_path):
    from nlgen.finetune import artifacts

    folder = tmp_path / "out.checkpoints"
    for step, state in ((2, "{}"), (4, '{"global_st'), (6, None)):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "config.json").write_text("{}")
        if state is not None:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert artifacts.last_checkpoint(folder) == folder / "checkpoint-2"
    artifacts.remove_incomplete_checkpoints(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2"]


def test_checkpoints_left_beside_a_finished_run_are_named(tiny_model, tmp_path, cli):
    """A kill in the second after the output's rename leaves OUT.checkpoints behind."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "nlgen_run.json").write_text("{}")
    (tmp_path / "out.checkpoints" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "out.checkpoints" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    for extra in ((), ("--resume",)):
        result = cli("finetune", str(CORPUS), "-m", str(tiny_model), "-o", str(out), *extra)
        assert result.exit_code == 1
        one_error(result.stderr, f"Error: output directory {out} already exists (a finished "
                  f"run), and so does {out}.checkpoints")
        assert "a finished run has nothing to resume: remove out.checkpoints" in result.stderr


# ---------------------------------------------------------------------- what finetune writes


def test_saved_weights_follow_the_umask_and_a_lora_names_its_base_as_given(
        tiny_model, tmp_path, cli, monkeypatch):
    shutil.copytree(tiny_model, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    result = cli("finetune", str(CORPUS), "-m", "base", "-o", "adapter", "--lora",
                 "--no-merge", *TRAIN)
    assert result.exit_code == 0, result.stderr
    adapter = tmp_path / "adapter"
    for file in adapter.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask(), file.name
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"
    assert json.loads((adapter / "nlgen_run.json").read_text())["base_model"]["source"] == "base"
    assert str(tmp_path) not in "".join(f.read_text(errors="replace")
                                        for f in adapter.iterdir() if f.suffix in (".json",
                                                                                   ".md"))
    # Loaded from elsewhere, the base is found beside the adapter.
    monkeypatch.chdir(tmp_path.parent)
    gen = cli("generate", "-m", str(Path(tmp_path.name) / "adapter"), "-n", "2", "--greedy", "A")
    assert gen.exit_code == 0, gen.stderr


# ---------------------------------------------------------------------- SIGTERM


def _wait_for(proc: subprocess.Popen, text: bytes, timeout: float = 180) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while text not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    return seen


def test_sigterm_to_finetune_saves_a_checkpoint_like_ctrl_c(tiny_model, tmp_path):
    out = tmp_path / "m"
    args = [sys.executable, "-m", "nlgen", "finetune", str(CORPUS), "--model", str(tiny_model),
            "-o", str(out), "--max-steps", "100000", "--logging-steps", "1", "--batch-size", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    seen = _wait_for(proc, b"step 3/")
    proc.send_signal(signal.SIGTERM)
    stdout, rest = proc.communicate(timeout=120)
    stderr = (seen + rest).decode()
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr and "checkpoint saved" in stderr
    assert "resume with: nlgen finetune" in stderr
    assert list((tmp_path / "m.checkpoints").glob("checkpoint-*"))
    assert not out.exists()


def test_sigterm_to_generate_is_an_interruption(tiny_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(2000)), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "nlgen", "generate", "-m", str(tiny_model),
                             "-n", "32", "-f", str(prompts)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.read(1)  # the first results are out
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.decode().rstrip().endswith("Error: interrupted"), stderr


# ---------------------------------------------------------------------- a lost rank


def test_a_lost_peer_is_named(monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "_peers", [(host, os.getpid()), (host, dead.pid),
                                                ("elsewhere", dead.pid)])
    failure = distributed.peer_failure(resumable=True)
    assert failure is not None and failure.origin_rank == 1
    assert failure.message == ("rank 1 stopped before the job was done; rerun with --resume "
                               "to continue")
    assert distributed.peer_failure(resumable=False).message == (
        "rank 1 stopped before the job was done")
    monkeypatch.setattr(distributed, "_peers", [(host, os.getpid()), (host, os.getpid())])
    assert distributed.peer_failure(resumable=True) is None


KILL_RANK_1 = textwrap.dedent("""
    import os, signal, sys
    from nlgen.cli.app import main
    if os.environ.get("RANK") == "1":
        import nlgen.engine.generation as g
        real = g.generate_indexed
        def dying(*args, **kwargs):
            for n, item in enumerate(real(*args, **kwargs)):
                if n == 3:
                    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does
                yield item
        g.generate_indexed = dying
    sys.argv = ["nlgen", *sys.argv[1:]]
    main()
""")


SIGTERM_WHILE_DIAGNOSING = textwrap.dedent("""
    import os, signal, time
    import typer
    from nlgen.cli import runtime
    from nlgen.jobs.distributed import DistributedError

    def diagnosis(kwargs):
        # What the launcher does on a lost rank: its SIGTERM comes while rank 0 looks for it.
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        return DistributedError("rank 1 stopped before the job was done", origin_rank=1)

    runtime._lost_peer = diagnosis

    @runtime.guard
    def job():
        raise RuntimeError("gloo: connection closed by peer")

    try:
        job()
    except typer.Exit as exc:  # what the app would turn into the exit status
        raise SystemExit(exc.exit_code)
""")


def test_a_sigterm_while_rank_0_names_the_lost_rank_does_not_silence_it():
    proc = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_DIAGNOSING], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Error: rank 1 stopped before the job was done" in proc.stderr, proc.stderr
    assert "bug in nlgen" not in proc.stderr


def test_a_rank_killed_under_torchrun_is_one_line_on_rank_0(tiny_model, tmp_path):
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(200)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), "generate", "-m", str(tiny_model), "-n", "4", "-f", str(prompts),
         "--output", str(tmp_path / "out.jsonl")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("Error:", "Hint:"))]
    assert ours[:1] == ["Error: rank 1 stopped before the job was done; rerun with --resume to "
                        "continue"], proc.stderr[-3000:]
    assert "bug in nlgen" not in proc.stderr
