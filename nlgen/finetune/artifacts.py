"""What a run leaves on disk: the output directory, its checkpoints, and the run record.

The model directory is written to a temporary sibling and renamed into place when complete,
so a crash never leaves a half-written model where a finished one is expected. Checkpoints
live beside it (``OUTPUT.checkpoints``) with ``nlgen_state.json``: the settings the run started
with and the validation loss before training, which a resumed run cannot recompute.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nlgen.errors import InputError, OutputError, UsageError, write_failure
from nlgen.finetune.options import FinetuneOptions
from nlgen.inputs import STDIN, Source
from nlgen.models.gguf import umask_modes

RECORD = "nlgen_run.json"
STATE = "nlgen_state.json"  # in the checkpoints dir

# Settings that change what a checkpoint means: a resumed run must keep them. The others
# (where and how often to log, sample, save and report) may change between the two runs.
RESUME_FIXED = ("model", "text_field", "input_format", "train_on", "skip_bad", "line_by_line",
                "validation_split", "block_size",
                "epochs", "max_steps", "learning_rate", "batch_size",
                "gradient_accumulation_steps", "warmup_ratio", "weight_decay", "seed",
                "precision", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def default_output_dir(model: str, data: tuple[str, ...]) -> Path:
    """``<model>-<first input>-finetuned`` in the working directory."""
    base = Path(model).stem if model.endswith(".gguf") else model
    first = data[0]
    name = "stdin" if first == STDIN else Path(first.rstrip("/")).stem
    return Path(f"{_slug(Path(base).name)}-{_slug(name)}-finetuned")


def checkpoint_dir_for(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoints")


def checkpoints_in(directory: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) of every ``checkpoint-N`` folder. The Trainer writes the state
    file last: a checkpoint is complete when that file is there and whole."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)):
            try:
                complete = isinstance(json.loads((p / "trainer_state.json").read_text()), dict)
            except (OSError, ValueError):
                complete = False
            found.append((int(m.group(1)), p, complete))
    return sorted(found)


def last_checkpoint(directory: Path) -> Path | None:
    complete = [p for _, p, ok in checkpoints_in(directory) if ok]
    return complete[-1] if complete else None


def after_write_failure(checkpoints: Path) -> str:
    """Clear what a failed write left (half a checkpoint; a checkpoints folder with none
    whole); the hint: how to go on."""
    remove_incomplete_checkpoints(checkpoints)
    last = last_checkpoint(checkpoints)
    if last is None:
        shutil.rmtree(checkpoints, ignore_errors=True)
        return "free some space, then run again"
    return f"free some space, then rerun with --resume (from step {checkpoint_step(last)})"


def remove_incomplete_checkpoints(directory: Path) -> None:
    """What a failed or killed save left: a ``checkpoint-N`` that only looks like one."""
    for _, path, complete in checkpoints_in(directory):
        if not complete:
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def saving_checkpoints(checkpoints: Path, main: bool = True) -> Iterator[None]:
    """Training, whose checkpoints may meet a full disk: one error, and no half checkpoint
    (``main``: the process that writes them, and cleans up)."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:
        why = write_failure(exc, checkpoints)
        if why is None:  # not a write that failed
            if main:
                remove_incomplete_checkpoints(checkpoints)
            raise
        half = [p for _, p, complete in checkpoints_in(checkpoints) if not complete]
        what = f"save {half[-1].name} in" if half else "write to"
        raise OutputError(f"cannot {what} {checkpoints}: {why}",
                          hint=after_write_failure(checkpoints) if main else None) from None
    except BaseException:  # a second Ctrl-C in the middle of a save
        if main:
            remove_incomplete_checkpoints(checkpoints)
        raise


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


@dataclass(frozen=True)
class Plan:
    """Where this run writes, and the checkpoint it resumes from (if any)."""

    output: Path  # absolute
    checkpoints: Path
    resume_from: Path | None


def plan_output(opts: FinetuneOptions, model_id: str) -> Plan:
    """Refuse to overwrite; find the checkpoint to resume. Nothing is written here."""
    output = Path(opts.output_dir).expanduser() if opts.output_dir else default_output_dir(
        model_id, opts.data)
    output = output.absolute()
    checkpoints = checkpoint_dir_for(output)
    if output.exists() and not opts.overwrite:
        what = "a finished run" if (output / RECORD).is_file() else "something"
        if checkpoints.exists():  # kept, or left by a run killed as it finished
            raise OutputError(f"output directory {output} already exists ({what}), and so "
                              f"does {checkpoints}", hint=(
                                  "a finished run has nothing to resume: " if
                                  what == "a finished run" else "") +
                              f"remove {checkpoints.name} if it is not wanted; --overwrite "
                              "replaces both, or choose --output-dir")
        raise OutputError(f"output directory {output} already exists ({what})",
                          hint="pass --overwrite to replace it, or choose --output-dir")
    if not output.parent.is_dir():
        why = "does not exist" if not output.parent.exists() else "is not a directory"
        raise OutputError(f"cannot create {output}: {output.parent} {why}")
    last = last_checkpoint(checkpoints)
    if opts.resume:
        if last is None:
            raise InputError(f"no checkpoint to resume from in {checkpoints}",
                             hint="run the same command without --resume")
        return Plan(output, checkpoints, last)
    if last is not None and not opts.overwrite:
        raise OutputError(f"an interrupted run left checkpoints in {checkpoints}",
                          hint="add --resume to continue it, or --overwrite to start over")
    return Plan(output, checkpoints, None)


def run_settings(opts: FinetuneOptions, sources: list[Source], validation: list[Source],
                 world_size: int) -> dict[str, Any]:
    """What a checkpoint was trained with: the fixed options, the data's fingerprints."""
    fixed = _jsonable({name: getattr(opts, name) for name in RESUME_FIXED})
    return {**fixed, "data": [s.sha256 for s in sources],
            "validation_file": [s.sha256 for s in validation], "processes": world_size}


def write_state(checkpoints: Path, settings: dict[str, Any], before_loss: float | None) -> None:
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / STATE).write_text(json.dumps({"settings": settings,
                                                     "before_loss": before_loss}))
    except OSError as exc:
        with suppress(OSError):
            (checkpoints / STATE).unlink(missing_ok=True)
        raise OutputError(f"cannot write to {checkpoints}: {write_failure(exc)}",
                          hint=after_write_failure(checkpoints)) from None


def read_state(checkpoints: Path) -> dict[str, Any]:
    path = checkpoints / STATE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def check_resume_settings(checkpoints: Path, settings: dict[str, Any]) -> None:
    """A resumed run keeps every setting that defines its checkpoint, or stops (exit 2)."""
    saved = read_state(checkpoints).get("settings")
    if not saved:
        return  # a checkpoint from before the settings were kept: nothing to compare
    differ = [name for name in settings if name in saved and saved[name] != settings[name]]
    if differ:
        shown = "; ".join(_difference(name, saved[name], settings[name]) for name in differ)
        raise UsageError(f"--resume with settings that differ from the checkpoint's: {shown}",
                         hint="resume with the settings of the interrupted run, or start over "
                         "with --overwrite")


def _difference(name: str, then: Any, now: Any) -> str:
    if name in ("data", "validation_file"):
        return f"the {name.replace('_', ' ')} changed (sha256)"
    if name == "processes":
        return f"{then} processes then, {now} now"
    return f"--{name.replace('_', '-')} {then} then, {now} now"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_record(opts: FinetuneOptions, *, command: str | None, base: dict[str, str],
                 sources: list[Source], validation: dict[str, Any] | None,
                 hyperparameters: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """``nlgen_run.json``: enough to know what was trained on what, how, and how it went."""
    return {
        "nlgen_version": _version("nlgen"),
        "transformers_version": _version("transformers"),
        "torch_version": _version("torch"),
        "command": command,
        "base_model": base,
        "data": [{"path": s.name, "sha256": s.sha256, "bytes": s.size} for s in sources],
        "validation": validation,
        "hyperparameters": {**_jsonable(asdict(opts)), **hyperparameters},
        **run,
        "lora": ({"r": opts.lora_r, "alpha": opts.lora_alpha, "dropout": opts.lora_dropout,
                  "target": list(opts.lora_target) or None, "merged": opts.merge}
                 if opts.lora else None),
        "wall_time_s": None,
    }


def partial_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial")


def finish_output(trainer: Any, tokenizer: Any, opts: FinetuneOptions, plan: Plan,
                  record: dict[str, Any], started: float, curve: list[dict[str, Any]]) -> None:
    """Complete the temporary directory, then rename it into place (main process only)."""
    from nlgen.finetune.curve import write_curve

    tmp = partial_dir(plan.output)
    if opts.lora and opts.merge:
        # Merging folds B @ A into the base weights: a plain model every loader understands.
        trainer.model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
    elif opts.lora:  # the base as the user named it (peft writes the path it was loaded from)
        _name_base(tmp / "adapter_config.json", record["base_model"]["source"])
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the record says it all
    tokenizer.save_pretrained(tmp)  # with its chat template: generate --chat uses it
    names = ", ".join(Path(d["path"]).name for d in record["data"][:3])
    record["loss_curve"] = write_curve(
        tmp, curve, f"{record['base_model']['name']} on {names} ({record['format']})",
        opts.logging_steps)
    runs = plan.checkpoints / "runs"
    if runs.is_dir():  # tensorboard logs belong with the model
        shutil.move(str(runs), str(tmp / "runs"))
    record["wall_time_s"] = round(time.time() - started, 3)
    (tmp / RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                              encoding="utf-8")
    umask_modes(tmp)  # safetensors writes its files 0600; a model is a file like any other
    output = plan.output
    if output.exists():  # --overwrite: the old directory goes only once the new one is whole
        trash = output.with_name(f".{output.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(output, trash)
        os.replace(tmp, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, output)
    if not opts.keep_checkpoints:
        shutil.rmtree(plan.checkpoints, ignore_errors=True)


def _name_base(config: Path, base: str) -> None:
    """The adapter's base, in adapter_config.json and peft's model card, as the user gave it
    (nlgen.models.loading finds it again), not the absolute path it was loaded from."""
    data = json.loads(config.read_text(encoding="utf-8"))
    loaded_from, data["base_model_name_or_path"] = data.get("base_model_name_or_path"), base
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    card = config.with_name("README.md")
    if loaded_from and card.is_file():
        card.write_text(card.read_text(encoding="utf-8").replace(loaded_from, base),
                        encoding="utf-8")
