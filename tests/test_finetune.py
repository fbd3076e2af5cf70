"""`nlgen finetune`: training on the tiny GPT-2, outputs, resume, LoRA, two processes, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CORPUS, ROOT, run_nlgen

EXAMPLES = ROOT / "examples" / "data"
FAST = ("--max-steps", "8", "--learning-rate", "1e-3", "--logging-steps", "4", "--seed", "0")


def weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def record(directory: Path) -> dict:
    return json.loads((directory / "nlgen_run.json").read_text(encoding="utf-8"))


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """One CLI run shared by the tests that only read its output: (result, output dir)."""
    from typer.testing import CliRunner

    from nlgen.cli.app import app

    out = tmp_path_factory.mktemp("trained") / "model"
    result = CliRunner().invoke(app, ["finetune", str(CORPUS), "--model", str(tiny_model),
                                      "-o", str(out), "--sample-every", "4",
                                      "--sample-prompt", "The fox", *FAST],
                                catch_exceptions=False)
    return result, out


# ----------------------------------------------------------------------------- a normal run


def test_loss_drops_and_output_is_complete(trained):
    result, out = trained
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"  # stdout carries the result only
    ppl = record(out)["validation_perplexity"]
    assert ppl["after"] < ppl["before"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "nlgen_run.json"} <= set(
        listing(out))
    assert not any(n.endswith(".bin") for n in listing(out))
    assert not (out.parent / "model.checkpoints").exists()  # removed after success
    assert not list(out.parent.glob(".model.*"))  # no temporary left behind
    assert "validation perplexity (before training" in result.stderr
    assert "KL from the base" in result.stderr  # next to the perplexity before -> after
    assert "sample at step 4: 'The fox" in result.stderr
    assert "step 8/8" in result.stderr


def test_run_record(trained, tiny_model: Path):
    _, out = trained
    rec = record(out)
    assert rec["base_model"]["source"] == str(tiny_model)
    assert rec["data"] == [{"path": str(CORPUS), "bytes": CORPUS.stat().st_size,
                            "sha256": hashlib.sha256(CORPUS.read_bytes()).hexdigest()}]
    from nlgen.models.devices import cpu_has_fast_bf16

    hp = rec["hyperparameters"]
    assert (hp["max_steps"], hp["learning_rate"], hp["batch_size"], hp["block_size"],
            hp["seed"]) == (8, 1e-3, 4, 128, 0)
    # --precision auto: bf16 mixed precision on a CPU with native bfloat16, else fp32.
    assert (hp["precision_option"], hp["precision"]) == (
        "auto", "bf16" if cpu_has_fast_bf16() else "fp32")
    assert rec["validation_precision"] == "fp32"  # measured with the KL, in float32
    assert rec["steps"] == 8
    assert 0 < rec["validation_kl"] < 10  # nats per token, the result against its base
    assert rec["tokens_seen"] == 8 * 4 * 128
    assert rec["wall_time_s"] > 0 and rec["train_tokens_per_second"] > 0
    assert rec["validation"] == {"split": 0.05}
    assert rec["validation_blocks"] >= 1
    assert rec["validation_perplexity"]["evaluations"][-1]["step"] == 8


def test_output_loads_in_generate_and_perplexity(trained, cli):
    _, out = trained
    gen = cli("generate", "--model", str(out), "-n", "5", "--greedy", "The fox")
    assert gen.exit_code == 0, gen.output
    assert gen.stdout.startswith("The fox")
    ppl = cli("perplexity", "--model", str(out), str(CORPUS))
    assert ppl.exit_code == 0, ppl.output


def test_inputs_jsonl_csv_directory_and_validation_file(tiny_model, tmp_path, cli):
    lines = [s.strip() + "." for s in CORPUS.read_text(encoding="utf-8").split(". ") if s.strip()]
    assert len(lines) > 60
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"body": ln, "id": i}) + "\n"
                             for i, ln in enumerate(lines[:20])), encoding="utf-8")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "one.txt").write_text("\n".join(lines[20:30]), encoding="utf-8")
    (docs / "sub" / "two.md").write_text("\n".join(lines[30:40]), encoding="utf-8")
    (docs / "skip.bin").write_bytes(b"\xff\xfe")
    val = tmp_path / "val.txt"
    val.write_text("\n".join(lines[40:]), encoding="utf-8")
    out = tmp_path / "m"
    r = cli("finetune", str(jsonl), str(docs), "--text-field", "body", "--validation-file",
            str(val), "--model", str(tiny_model), "-o", str(out), "--max-steps", "2",
            "--block-size", "64")
    assert r.exit_code == 0, r.output
    rec = record(out)
    assert [d["path"] for d in rec["data"]] == [str(jsonl), str(docs / "one.txt"),
                                                str(docs / "sub" / "two.md")]
    assert rec["validation"]["file"] == str(val)
    assert rec["hyperparameters"]["block_size"] == 64

    table = tmp_path / "t.csv"
    table.write_text("id,text\n" + "".join(f'{i},"{ln}"\n' for i, ln in enumerate(lines[:30])),
                     encoding="utf-8")
    r = cli("finetune", str(table), "-", "--line-by-line", "--model", str(tiny_model),
            "-o", str(tmp_path / "m2"), "--max-steps", "1", "--block-size", "64",
            input="\n".join(lines[30:60]))
    assert r.exit_code == 0, r.output
    assert record(tmp_path / "m2")["data"][1]["path"] == "<stdin>"


def test_corpus_shorter_than_a_block_still_trains(tiny_model, tmp_path, cli):
    short = tmp_path / "short.txt"
    short.write_text("The fox walked to the river to drink.", encoding="utf-8")
    r = cli("finetune", str(short), "--model", str(tiny_model), "-o", str(tmp_path / "m"),
            "--max-steps", "2")
    assert r.exit_code == 0, r.output
    assert "less than two blocks" in r.stderr and "blocks of" in r.stderr
    rec = record(tmp_path / "m")
    assert rec["train_blocks"] == 1 and rec["validation_blocks"] == 1
    assert rec["hyperparameters"]["block_size"] < 128


# ----------------------------------------------------------------------------- speed


@pytest.mark.parametrize("fast", [True, False])
def test_precision_auto_is_bf16_on_a_cpu_with_native_bfloat16(monkeypatch, caplog, fast):
    import logging

    import torch

    from nlgen.finetune import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run, "cpu_has_fast_bf16", lambda: fast)
    with caplog.at_level(logging.INFO, logger="nlgen"):
        assert run.resolve_precision("auto", "auto") == ("bf16" if fast else "fp32", True)
    assert ("bf16 mixed precision" if fast else "no native bfloat16") in caplog.text
    # Asked for, a precision is kept, whatever the CPU.
    assert run.resolve_precision("fp32", "auto") == ("fp32", True)
    assert run.resolve_precision("bf16", "cpu") == ("bf16", True)


def test_validation_is_measured_once_with_the_kl(tiny_model, tmp_path, monkeypatch):
    """Packed text on one process: the float32 pass that measures the KL gives the validation
    loss before (the base) and after (the result), in float32 after bf16 training too; no
    Trainer evaluation repeats it."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from nlgen import finetune
    from nlgen.finetune import run
    from nlgen.finetune.data import prepare_data
    from nlgen.inputs import check_sources

    calls = []
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a, **k: calls.append(1) or
                        evaluate(self, *a, **k))
    opts = finetune.FinetuneOptions(data=(str(CORPUS),), model=str(tiny_model),
                                    output_dir=str(tmp_path / "once"), max_steps=4,
                                    learning_rate=1e-3, seed=0, precision="bf16")
    events = []
    rec = finetune.finetune(opts, on_event=events.append).record
    assert not calls
    assert [e.when for e in events if isinstance(e, finetune.Evaluation)] == ["before", "end"]
    assert [e["step"] for e in rec["validation_perplexity"]["evaluations"]] == [4]
    # The numbers: each model's mean loss over the predicted tokens of the validation blocks.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = prepare_data(check_sources([str(CORPUS)], None), [], opts, tokenizer, 128,
                        contextlib.nullcontext)
    ids = torch.tensor(data.validation["input_ids"])
    for when, directory in (("before", tiny_model), ("after", tmp_path / "once")):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids).loss)
        assert rec["validation_loss"][when] == pytest.approx(loss, rel=1e-5), when
    # Records, or several processes: the Trainer measures them, as before.
    monkeypatch.setattr(run, "kl_runs", lambda *a: False)
    calls.clear()
    rec = finetune.finetune(finetune.FinetuneOptions(**{**opts.__dict__, "output_dir": str(
        tmp_path / "twice")})).record
    assert len(calls) == 2 and rec["validation_precision"] == rec["hyperparameters"]["precision"]


# ----------------------------------------------------------------------------- resume


def test_resume_equals_uninterrupted(tiny_model, tmp_path):
    from nlgen import finetune

    def opts(out: Path, **kw) -> finetune.FinetuneOptions:
        return finetune.FinetuneOptions(data=(str(CORPUS),), model=str(tiny_model),
                                        output_dir=str(out), max_steps=6, learning_rate=1e-3,
                                        seed=3, gradient_accumulation_steps=2, **kw)

    straight = finetune.finetune(opts(tmp_path / "straight"))

    def interrupt_at_3(event) -> None:  # a real SIGINT, as Ctrl-C sends, mid-run
        if isinstance(event, finetune.StepProgress) and event.step == 3 and not event.logged:
            signal.raise_signal(signal.SIGINT)

    out = tmp_path / "resumed"
    with pytest.raises(finetune.TrainingInterrupted) as info:
        finetune.finetune(opts(out), on_event=interrupt_at_3)
    assert info.value.exit_code == 130 and info.value.step == 3
    assert (tmp_path / "resumed.checkpoints" / "checkpoint-3").is_dir()
    assert not out.exists()
    resumed = finetune.finetune(opts(out, resume=True))
    assert resumed.record["resumed_from_step"] == 3
    assert resumed.record["steps"] == 6
    assert (resumed.record["validation_perplexity"]["before"]
            == straight.record["validation_perplexity"]["before"])
    a, b = weights(tmp_path / "straight"), weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tiny_model, tmp_path):
    out = tmp_path / "m"
    args = [sys.executable, "-m", "nlgen", "finetune", str(CORPUS), "--model", str(tiny_model),
            "-o", str(out), "--max-steps", "100000", "--logging-steps", "1", "--batch-size", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=os.environ.copy())
    seen = b""
    deadline = time.monotonic() + 120
    assert proc.stderr is not None
    while b"step 3/" not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    proc.send_signal(signal.SIGINT)
    stdout, rest = proc.communicate(timeout=120)
    stderr = (seen + rest).decode()
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr and "checkpoint saved" in stderr
    assert "resume with: nlgen finetune" in stderr and "--resume" in stderr
    assert stdout == b""
    assert not out.exists()
    assert list((tmp_path / "m.checkpoints").glob("checkpoint-*"))
    # Rerunning without --resume refuses to clobber the interrupted run.
    again = run_nlgen(*args[3:])
    assert again.returncode == 1 and b"--resume" in again.stderr


# ----------------------------------------------------------------------------- LoRA


def test_lora_trains_and_merges(tiny_model, tmp_path, cli):
    out = tmp_path / "merged"
    r = cli("finetune", str(CORPUS), "--model", str(tiny_model), "-o", str(out), "--lora",
            "--lora-r", "4", "--lora-target", "c_attn,c_proj", *FAST)
    assert r.exit_code == 0, r.output
    assert not (out / "adapter_config.json").exists()
    base, tuned = weights(tiny_model), weights(out)
    assert set(base) == set(tuned)  # a plain model: no lora_A / lora_B left
    changed = [k for k in base if not (base[k] == tuned[k]).all()]
    assert changed and all(k.endswith(("c_attn.weight", "c_proj.weight")) for k in changed)
    ppl = record(out)["validation_perplexity"]
    assert ppl["after"] < ppl["before"]
    assert record(out)["lora"]["merged"] is True
    assert record(out)["validation_kl"] > 0  # the adapter switched off is the base
    assert cli("generate", "--model", str(out), "-n", "3", "--greedy", "A").exit_code == 0

    kept = tmp_path / "adapters"
    r = cli("finetune", str(CORPUS), "--model", str(tiny_model), "-o", str(kept), "--lora",
            "--no-merge", "--max-steps", "2")
    assert r.exit_code == 0, r.output
    assert (kept / "adapter_config.json").is_file()
    assert (kept / "adapter_model.safetensors").is_file()
    gen = cli("generate", "--model", str(kept), "-n", "3", "--greedy", "A")
    assert gen.exit_code == 0, gen.output


# ----------------------------------------------------------------------------- two processes


def test_two_process_run_finishes(tiny_model, tmp_path):
    """Two CPU processes under accelerate launch (gloo DDP).

    ``accelerate launch --cpu --num_processes 2`` starts one process unless mpirun is set up;
    ``--multi_gpu`` on a machine without GPUs is accelerate's way to torchrun N CPU processes.
    """
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "nlgen", "finetune", str(CORPUS), "--model", str(tiny_model), "-o", str(out),
         *FAST],
        capture_output=True, cwd=ROOT, env=os.environ.copy(), timeout=300)
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert proc.stdout.decode() == f"{out}\n"  # printed by the main process only
    rec = record(out)
    assert rec["world_size"] == 2
    assert rec["tokens_seen"] == 8 * 2 * 4 * 128
    assert stderr.count("validation perplexity (before") == 1
    ppl = rec["validation_perplexity"]
    assert ppl["after"] < ppl["before"]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def bad_inputs(tmp_path: Path) -> Path:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "nofield.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    (tmp_path / "nocol.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    (tmp_path / "ok.txt").write_text(CORPUS.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine", encoding="utf-8")
    (tmp_path / "nodir").mkdir()
    return tmp_path


BAD = [
    (["missing.txt"], 1, "file not found"),
    (["empty.txt"], 1, "is empty"),
    (["blank.txt"], 1, "is empty"),
    (["latin1.txt"], 1, "not valid UTF-8 (byte 0xe9 at offset 3)"),
    (["nofield.jsonl"], 1, "line 2 has no 'text' field"),
    (["nocol.csv"], 1, "no 'text' column"),
    (["nodir"], 1, "holds no text files"),
    (["ok.txt", "--precision", "fp16"], 2, "fp16 needs a CUDA GPU"),
    (["ok.txt", "--precision", "fp8"], 2, "Invalid value for '--precision'"),
    (["ok.txt", "--block-size", "256"], 2, "larger than the model's context (128 tokens)"),
    (["ok.txt", "-o", "exists"], 1, "already exists"),
    (["ok.txt", "--epochs", "1", "--max-steps", "3"], 2, "--epochs or --max-steps"),
    (["ok.txt", "--resume"], 1, "no checkpoint to resume"),
    (["ok.txt", "--no-merge"], 2, "need --lora"),
    (["ok.txt", "--validation-split", "1.5"], 2, "--validation-split must be in"),
    (["ok.txt", "--report-to", "surely-not-installed"], 2, "not installed"),
]


@pytest.mark.parametrize(("args", "code", "message"), BAD,
                         ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_input_fails_before_training_and_writes_nothing(
        bad_inputs, tiny_model, cli, monkeypatch, args, code, message):
    monkeypatch.chdir(bad_inputs)
    before = listing(bad_inputs)
    out = [] if "-o" in args else ["-o", "out"]
    steps = [] if "--max-steps" in args else ["--max-steps", "1"]
    r = cli("finetune", *args, "--model", str(tiny_model), *out, *steps)
    assert r.exit_code == code, r.output
    assert message in r.stderr
    assert r.stderr.count("Error:") == 1 and r.stdout == ""
    assert listing(bad_inputs) == before  # nothing written, nothing removed


# ----------------------------------------------------------------------------- built-in model


@pytest.mark.slow
def test_builtin_model_perplexity_drops_on_example_text(tmp_path):
    text = EXAMPLES / "garden.txt"
    assert text.is_file()
    out = tmp_path / "builtin-ft"
    proc = run_nlgen("finetune", str(text), "--model", "builtin", "-o", str(out),
                     "--block-size", "64", "--batch-size", "2", "--max-steps", "4",
                     "--learning-rate", "1e-4", "--validation-split", "0.2", "--seed", "0")
    assert proc.returncode == 0, proc.stderr.decode()
    ppl = record(out)["validation_perplexity"]
    assert ppl["after"] < ppl["before"]


@pytest.mark.slow
def test_default_model_fallback_names_the_output_after_builtin(cli, tmp_path, monkeypatch):
    """No --model, no Hub: the default falls back to builtin, and the output is named after it."""
    data = tmp_path / "notes.txt"
    data.write_text((ROOT / "examples" / "data" / "garden.txt").read_text(encoding="utf-8"),
                    encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = cli("finetune", str(data), "--max-steps", "1", "--block-size", "32",
                 "--batch-size", "1")
    assert result.exit_code == 0, result.stderr
    assert "using the built-in model" in result.stderr
    assert (tmp_path / "builtin-notes-finetuned" / "config.json").is_file()
    assert not (tmp_path / "gpt2-notes-finetuned").exists()
