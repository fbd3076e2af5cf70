"""Fine-tuning: data loading and packing, the training run, checkpoints, resume, the run record.

Built on transformers' ``Trainer`` rather than a hand-written accelerate loop. The Trainer is
itself an accelerate loop, and it already gives every item the issue asks for: gradient
accumulation that steps on the right micro-batch, mixed precision, gradient checkpointing,
checkpoints with ``save_total_limit``, resume that restores optimizer, scheduler, RNG states and
skips the batches already seen (so a resumed run ends bit-identical on CPU), ``report_to``
integrations, loss-only evaluation, and multi-process runs under ``accelerate launch``
(DDP, FSDP, DeepSpeed) without a line of ours. An accelerate loop would re-implement all of that
in a few hundred lines we would have to test; what is left here is what is specific to nlgen:
strict input checks before anything is written, EOS-joined packing, the atomic output
directory, the run record and the progress events the CLI renders.

Flow: :class:`FinetuneOptions` (validated on construction) -> :func:`finetune` -> events to an
``on_event`` callback while it runs -> :class:`FinetuneResult`. This module never prints: notices
go to the ``nlgen`` logger, progress to ``on_event``.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nlgen.errors import EXIT_INTERRUPTED, InputError, NlgenError, OutputError, UsageError
from nlgen.inputs import STDIN, read_text, utf8_error

log = logging.getLogger("nlgen")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")  # what a directory input contributes
MAX_DEFAULT_BLOCK = 1024
RECORD = "nlgen_run.json"
STATE = "nlgen_state.json"  # in the checkpoints dir: what a resumed run cannot recompute


class TrainingInterrupted(NlgenError):
    """Ctrl-C during training: a checkpoint was saved; the CLI adds the command that resumes."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved in {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class FinetuneOptions:
    """Everything a run needs; names follow TrainingArguments where one exists."""

    data: tuple[str, ...]  # .txt / .jsonl / .csv files, directories, or "-" (stdin)
    model: str | None = None  # None: the default model resolution of `generate`
    output_dir: str | None = None  # None: "<model>-<data>-finetuned" in the working directory
    overwrite: bool = False
    resume: bool = False
    keep_checkpoints: bool = False  # keep <output>.checkpoints after a successful run
    # data
    line_by_line: bool = False  # each non-blank line of a text input is a document
    text_field: str = "text"  # the .jsonl / .csv field that holds the text
    validation_file: str | None = None
    validation_split: float | None = None  # share of the packed blocks (None: 5%, at least
    # one block; 0: no validation). Not with validation_file.
    block_size: int | None = None  # None: the model's context, capped at 1024
    # training
    epochs: float | None = None  # None and no max_steps: 3 epochs (run_clm's default)
    max_steps: int | None = None
    learning_rate: float | None = None  # None: 5e-5, or 2e-4 with LoRA
    batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    seed: int = 42
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (mixed precision; weights stay fp32)
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda (which GPU: CUDA_VISIBLE_DEVICES / accelerate)
    # LoRA
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: tuple[str, ...] = ()  # () : peft's default modules for the architecture
    merge: bool = True  # save LoRA merged into the base weights (else adapters only)
    # watching and saving
    sample_every: int = 0
    sample_prompt: str = ""  # "" : start from the EOS token (an unconditional sample)
    sample_max_new_tokens: int = 30
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    report_to: tuple[str, ...] = ()
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.data:
            raise UsageError("no training data given", hint="nlgen finetune data.txt")
        if self.epochs is not None and self.max_steps is not None:
            raise UsageError("give --epochs or --max-steps, not both")
        if self.epochs is not None and not self.epochs > 0:
            raise UsageError(f"--epochs must be positive, not {self.epochs}")
        positive = {
            "--max-steps": self.max_steps, "--batch-size": self.batch_size,
            "--gradient-accumulation-steps": self.gradient_accumulation_steps,
            "--block-size": self.block_size, "--logging-steps": self.logging_steps,
            "--save-steps": self.save_steps, "--save-total-limit": self.save_total_limit,
            "--lora-r": self.lora_r, "--lora-alpha": self.lora_alpha,
            "--sample-max-new-tokens": self.sample_max_new_tokens,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise UsageError(f"{name} must be at least 1, not {value}")
        if self.block_size is not None and self.block_size < 2:
            raise UsageError("--block-size must be at least 2")
        if self.sample_every < 0:
            raise UsageError("--sample-every must be 0 (off) or positive")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise UsageError(f"--learning-rate must be positive, not {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"--warmup-ratio must be in [0, 1), not {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise UsageError("--weight-decay must not be negative")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1), not {self.lora_dropout}")
        if self.validation_split is not None and not 0 <= self.validation_split < 1:
            raise UsageError(f"--validation-split must be in [0, 1), not {self.validation_split}")
        if self.validation_file is not None and self.validation_split is not None:
            raise UsageError("give --validation-file or --validation-split, not both")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown --precision {self.precision!r}",
                             hint="use one of: " + ", ".join(PRECISIONS))
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"invalid --device {self.device!r} for finetune",
                             hint="use auto, cpu or cuda; choose GPUs with CUDA_VISIBLE_DEVICES "
                             "or accelerate launch")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues a run; --overwrite starts over: pick one")
        if not self.lora and (self.lora_target or not self.merge):
            raise UsageError("--lora-target and --no-merge need --lora")
        if not self.text_field:
            raise UsageError("--text-field must not be empty")
        if self.data.count(STDIN) + (self.validation_file == STDIN) > 1:
            raise UsageError("stdin ('-') can be read only once")

    @property
    def split(self) -> float:
        if self.validation_file is not None:
            return 0.0
        return 0.05 if self.validation_split is None else self.validation_split

    @property
    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if self.lora else 5e-5  # LoRA's few parameters want larger steps


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Progress:
    """Sent after every optimizer step (``logged=False``) and when the loss is logged (True)."""

    step: int
    max_steps: int
    epoch: float
    loss: float | None  # mean training loss over the last logging interval
    learning_rate: float | None
    tokens_per_second: float  # training tokens (all processes) per second of step time
    eta_seconds: float | None
    logged: bool


@dataclass(frozen=True)
class Evaluation:
    step: int
    epoch: float
    loss: float
    perplexity: float
    when: str  # "before" | "epoch" | "end"


@dataclass(frozen=True)
class Sample:
    step: int
    text: str


@dataclass(frozen=True)
class Started:
    """Sent once the data is packed and the model loaded, just before the first step."""

    model: str
    train_blocks: int
    validation_blocks: int
    block_size: int
    max_steps: int
    precision: str
    device: str
    world_size: int
    output_dir: Path
    checkpoint_dir: Path
    resumed_from: int | None  # the step of the checkpoint resumed, if any


Event = Progress | Evaluation | Sample | Started


@dataclass
class FinetuneResult:
    output_dir: Path
    record: dict[str, Any] = field(default_factory=dict)
    is_main_process: bool = True


# ----------------------------------------------------------------------------- input checks


@dataclass(frozen=True)
class Source:
    """One checked input: where it is, how to read it, and its fingerprint for the record."""

    name: str  # as given (a path, or "-")
    path: Path | None  # None for stdin
    kind: str  # "text" | "jsonl" | "csv"
    sha256: str
    size: int
    text: str | None = None  # stdin's content (it cannot be read twice)


def launched_processes() -> int:
    """How many processes a launcher (accelerate, torchrun) started for this run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a multi-process launch (accelerate, torchrun)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") in ("0", "-1")


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".csv": "csv"}.get(suffix, "text")


def _expand(name: str) -> list[tuple[str, Path | None]]:
    if name == STDIN:
        return [(name, None)]
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise InputError(f"directory {name} holds no text files",
                             hint="it is searched for " + ", ".join(TEXT_SUFFIXES))
        return [(str(p), p) for p in files]
    if not path.exists():
        raise InputError(f"file not found: {name}")
    if not path.is_file():
        raise InputError(f"{name} is not a regular file")
    return [(name, path)]


def _scan(name: str, path: Path) -> tuple[str, int, bool]:
    """sha256, size and "holds non-blank text", reading in chunks; non-UTF-8 is an error."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    has_text = False
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    raise utf8_error(name, chunk, exc.start, offset) from None
                has_text = has_text or bool(text.strip())
                offset += len(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise InputError(f"{name} is not valid UTF-8 (it ends inside a character)",
                                 hint="the file may be truncated") from None
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror}") from None
    return digest.hexdigest(), offset, has_text


def _check_jsonl(name: str, path: Path, text_field: str) -> None:
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{name} line {number} is not JSON: {exc.msg}") from None
            if not isinstance(row, dict) or text_field not in row:
                fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise InputError(f"{name} line {number} has no {text_field!r} field "
                                 f"(it has: {fields})",
                                 hint="name the field that holds the text with --text-field")
            if not isinstance(row[text_field], str):
                raise InputError(f"{name} line {number}: field {text_field!r} is not a string")


def _check_csv(name: str, path: Path, text_field: str) -> None:
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), [])
    if text_field not in header:
        raise InputError(f"{name} has no {text_field!r} column (it has: {', '.join(header)})",
                         hint="name the column that holds the text with --text-field")


def check_sources(names: tuple[str, ...] | list[str], text_field: str) -> list[Source]:
    """Every input exists, is UTF-8 and holds text (and the text field, for jsonl/csv)."""
    sources: list[Source] = []
    for given in names:
        for name, path in _expand(given):
            if path is None:
                raw_text = read_text(STDIN).text
                raw = raw_text.encode("utf-8")
                if not raw_text.strip():
                    raise InputError("stdin is empty: no text to train on")
                sources.append(Source("<stdin>", None, "text", hashlib.sha256(raw).hexdigest(),
                                      len(raw), raw_text))
                continue
            sha, size, has_text = _scan(name, path)
            if size == 0 or not has_text:
                raise InputError(f"{name} is empty: no text to train on")
            kind = _kind(path)
            if kind == "jsonl":
                _check_jsonl(name, path, text_field)
            elif kind == "csv":
                _check_csv(name, path, text_field)
            sources.append(Source(name, path, kind, sha, size))
    return sources


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def default_output_dir(model: str | None, data: tuple[str, ...]) -> Path:
    from nlgen.models import DEFAULT_MODEL

    base = Path(model).stem if model and model.endswith(".gguf") else (model or DEFAULT_MODEL)
    first = data[0]
    name = "stdin" if first == STDIN else Path(first.rstrip("/")).stem
    return Path(f"{_slug(Path(base).name)}-{_slug(name)}-finetuned")


def checkpoint_dir_for(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoints")


def last_checkpoint(directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
             and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def check_output(opts: FinetuneOptions, output: Path) -> Path | None:
    """Refuse to overwrite; find the checkpoint to resume. Returns that checkpoint or None."""
    checkpoints = checkpoint_dir_for(output)
    if output.exists() and not opts.overwrite:
        what = "a finished run" if (output / RECORD).is_file() else "something"
        raise OutputError(f"output directory {output} already exists ({what})",
                          hint="pass --overwrite to replace it, or choose --output-dir")
    last = last_checkpoint(checkpoints)
    if opts.resume:
        if last is None:
            raise InputError(f"no checkpoint to resume from in {checkpoints}",
                             hint="run the same command without --resume")
        return last
    if last is not None and not opts.overwrite:
        raise OutputError(f"an interrupted run left checkpoints in {checkpoints}",
                          hint="add --resume to continue it, or --overwrite to start over")
    if not output.parent.exists():
        raise OutputError(f"cannot create {output}: {output.parent} does not exist")
    return None


# ----------------------------------------------------------------------------- device


def resolve_precision(precision: str, device: str) -> tuple[str, bool]:
    """-> (precision, use_cpu). Mixed precision that this device cannot run is a usage error."""
    import torch

    use_cpu = device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    cuda = torch.cuda.is_available() and not use_cpu
    if device == "cuda" and not cuda:
        raise UsageError("--device cuda: CUDA is not available on this machine",
                         hint="use --device cpu or auto")
    if not cuda:
        if precision == "fp16":
            raise UsageError("--precision fp16 needs a CUDA GPU; this run is on the CPU",
                             hint="use --precision bf16 or fp32 here")
        # bf16 autocast runs on any CPU (slowly without AVX512-BF16/AMX): allowed when asked,
        # never chosen by auto, since full float32 keeps a CPU run exactly reproducible.
        return ("fp32" if precision == "auto" else precision), True
    bf16_ok = torch.cuda.is_bf16_supported()
    if precision == "bf16" and not bf16_ok:
        raise UsageError("--precision bf16 is not supported by this GPU",
                         hint="use --precision fp16 or fp32")
    if precision == "auto":
        return ("bf16" if bf16_ok else "fp16"), False
    return precision, False


def _check_report_to(report_to: tuple[str, ...]) -> list[str]:
    wanted = [r for r in report_to if r != "none"]
    if not wanted:
        return []
    from transformers.integrations import get_available_reporting_integrations

    available = get_available_reporting_integrations()
    if "all" in wanted:
        return available
    missing = [r for r in wanted if r not in available]
    if missing:
        raise UsageError(f"--report-to {', '.join(missing)}: not installed",
                         hint="install it (e.g. pip install tensorboard); installed: "
                         + (", ".join(available) or "none"))
    return wanted


# ----------------------------------------------------------------------------- data


def _quiet_datasets() -> None:
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def load_texts(sources: list[Source], opts: FinetuneOptions):
    """The inputs as one datasets.Dataset with a single "text" column (one row a document)."""
    from datasets import Dataset, concatenate_datasets, load_dataset

    sample_by = "line" if opts.line_by_line else "document"
    parts = []
    texts = [s for s in sources if s.kind == "text" and s.path is not None]
    if texts:
        parts.append(load_dataset("text", data_files=[str(s.path) for s in texts], split="train",
                                  sample_by=sample_by, keep_linebreaks=not opts.line_by_line))
    for kind in ("json", "csv"):
        files = [str(s.path) for s in sources if s.kind == ("jsonl" if kind == "json" else kind)]
        if files:
            ds = load_dataset(kind, data_files=files, split="train")
            ds = ds.select_columns([opts.text_field])
            if opts.text_field != "text":
                ds = ds.rename_column(opts.text_field, "text")
            parts.append(ds)
    for s in sources:
        if s.text is not None:
            rows = s.text.splitlines() if opts.line_by_line else [s.text]
            parts.append(Dataset.from_dict({"text": rows}))
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(
        [p.cast(parts[0].features) for p in parts])
    # Blank lines (line by line) and empty records carry nothing to learn.
    return ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)


def _load(sources: list[Source], opts: FinetuneOptions):
    from datasets.exceptions import DatasetGenerationError

    try:
        return load_texts(sources, opts)
    except DatasetGenerationError as exc:
        # e.g. a jsonl field whose type changes between records: pyarrow cannot build a table.
        cause = exc.__cause__ or exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise InputError(f"cannot load the data: {first}",
                         hint="every record of a .jsonl/.csv file needs the same fields and "
                         "types") from None


def tokenize(ds, tokenizer, num_proc: int | None):
    """Each document's tokens followed by EOS, so that packed documents stay told apart."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the model's tokenizer has no EOS token to join documents with")

    def encode(batch: dict[str, list[str]]) -> dict[str, list]:
        ids = tokenizer(batch["text"])["input_ids"]
        ids = [x + [eos] for x in ids]
        return {"input_ids": ids, "length": [len(x) for x in ids]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                  desc="tokenizing")


def pack(ds, block_size: int, num_proc: int | None, whole: bool = False):
    """run_clm's group_texts: concatenate, cut into block_size chunks, drop the remainder.

    ``whole`` groups everything in one batch (small corpora), so that no block is lost to the
    per-batch remainder.
    """

    def group(batch: dict[str, list]) -> dict[str, list]:
        joined = [t for ids in batch["input_ids"] for t in ids]
        total = len(joined) // block_size * block_size
        blocks = [joined[i:i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    return ds.map(group, batched=True, batch_size=None if whole else 1000,
                  remove_columns=ds.column_names, num_proc=None if whole else num_proc,
                  desc=f"packing into blocks of {block_size}")


@dataclass
class PackedData:
    train: Any
    validation: Any | None
    block_size: int
    train_tokens: int  # tokens in the training text (before dropping remainders)


def prepare_data(sources: list[Source], validation: list[Source], opts: FinetuneOptions,
                 tokenizer, block_size: int, main_process_first: Callable[[], Any]) -> PackedData:
    _quiet_datasets()
    size = sum(s.size for s in sources)
    # Worker processes cost ~1 s each to start; worth it only on a large corpus.
    num_proc = min(os.cpu_count() or 1, 8) if size > 64 << 20 else None
    with main_process_first():
        tokens = tokenize(_load(sources, opts), tokenizer, num_proc)
        total = sum(tokens["length"])
        split = opts.split
        need = 2 if split > 0 else 1  # one training block, plus one for validation
        whole = False
        if total < need * block_size:
            shrunk = total // need
            if shrunk < 2:
                raise InputError(f"the training text is too short: {total} tokens",
                                 hint="give more text")
            log.warning("the training text holds only %d tokens, less than %s of %d; training "
                        "on blocks of %d tokens instead", total,
                        "two blocks (train + validation)" if need == 2 else "one block",
                        block_size, shrunk)
            block_size, whole = shrunk, True
        packed = pack(tokens, block_size, num_proc, whole)
        if len(packed) < need:  # per-batch remainders ate the blocks: regroup in one batch
            packed = pack(tokens, block_size, num_proc, whole=True)
        val_ds = None
        if split > 0:
            n_val = min(max(1, round(split * len(packed))), len(packed) - 1)
            parts = packed.train_test_split(test_size=n_val, seed=opts.seed, shuffle=True)
            packed, val_ds = parts["train"], parts["test"]
        elif validation:
            vtokens = tokenize(_load(validation, opts), tokenizer, num_proc)
            vtotal = sum(vtokens["length"])
            if vtotal < block_size:
                log.warning("the validation text holds only %d tokens, less than one block of "
                            "%d; evaluating it as one block of %d", vtotal, block_size, vtotal)
                val_ds = pack(vtokens, vtotal, None, whole=True)
            else:
                val_ds = pack(vtokens, block_size, num_proc)
    return PackedData(packed, val_ds, block_size, total)


# ----------------------------------------------------------------------------- the run


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


class _Interrupt:
    """Ctrl-C during training asks for a checkpoint at the end of the step; a second one quits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def _make_callback(on_event: Callable[[Event], None] | None, interrupt: _Interrupt,
                   opts: FinetuneOptions, tokenizer):
    import torch
    from transformers import TrainerCallback

    class NlgenCallback(TrainerCallback):
        """Progress events, samples, the per-epoch perplexity, and Ctrl-C's checkpoint."""

        def __init__(self) -> None:
            self.loss: float | None = None
            self.lr: float | None = None
            self.step_time = 0.0
            self.step_started: float | None = None
            self.tokens_at_start = 0
            self.steps_at_start = 0
            self.stopped_at: int | None = None
            self.evals: list[Evaluation] = []
            self.phase = "before"  # what an evaluation now measures: before | epoch | end

        def _emit(self, event: Event, state) -> None:
            if on_event is not None and state.is_world_process_zero:
                on_event(event)

        def _progress(self, state, logged: bool) -> Progress:
            done = state.global_step - self.steps_at_start
            tokens = state.num_input_tokens_seen - self.tokens_at_start
            rate = tokens / self.step_time if self.step_time > 0 else 0.0
            eta = (self.step_time / done * (state.max_steps - state.global_step)
                   if done else None)
            return Progress(state.global_step, state.max_steps, state.epoch or 0.0, self.loss,
                            self.lr, rate, eta, logged)

        def on_train_begin(self, args, state, control, **kwargs):
            self.phase = "epoch"
            self.tokens_at_start = state.num_input_tokens_seen
            self.steps_at_start = state.global_step

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_started = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.step_started is not None:
                self.step_time += time.perf_counter() - self.step_started
                self.step_started = None
            self._emit(self._progress(state, logged=False), state)
            if (opts.sample_every and state.global_step % opts.sample_every == 0
                    and state.is_world_process_zero and model is not None):
                self._emit(Sample(state.global_step, self._sample(model)), state)
            if state.global_step >= state.max_steps and not opts.keep_checkpoints:
                # The Trainer checkpoints the last step (weights and optimizer: 3x the model)
                # for a run about to save its model anyway and drop its checkpoints: skip it.
                control.should_save = False
            if self._stop_requested(args):
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

        def _stop_requested(self, args) -> bool:
            flag = interrupt.requested
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # Every rank must stop at the same step, or the others wait forever.
                t = torch.tensor([1.0 if flag else 0.0], device=args.device)
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                flag = bool(t.item())
            return flag

        @torch.no_grad()
        def _sample(self, model) -> str:
            was_training = model.training
            model.eval()
            try:
                device = next(model.parameters()).device
                if opts.sample_prompt:
                    ids = tokenizer(opts.sample_prompt, return_tensors="pt")["input_ids"]
                else:
                    ids = torch.tensor([[tokenizer.eos_token_id]])
                ids = ids.to(device)
                # Greedy: sampling would draw from the global RNG and change the training run.
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=opts.sample_max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                text = tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True)
                return (opts.sample_prompt + text) if opts.sample_prompt else text
            finally:
                if was_training:
                    model.train()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
                self.lr = float(logs.get("learning_rate", self.lr or 0.0))
                self._emit(self._progress(state, logged=True), state)

        def on_epoch_end(self, args, state, control, **kwargs):
            if self.stopped_at is not None:  # interrupted: no evaluation, already saved
                control.should_evaluate = False
                control.should_save = False
            return control

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if not metrics or "eval_loss" not in metrics:
                return
            loss = float(metrics["eval_loss"])
            ev = Evaluation(state.global_step, state.epoch or 0.0, loss, perplexity(loss),
                            self.phase)
            self.evals.append(ev)
            self._emit(ev, state)

    return NlgenCallback()


def finetune(opts: FinetuneOptions, on_event: Callable[[Event], None] | None = None,
             command: str | None = None) -> FinetuneResult:
    """Check everything, fine-tune, and write the model directory atomically."""
    with warnings.catch_warnings():
        # peft and the Trainer still call transformers names deprecated for v6; not the user's.
        warnings.filterwarnings("ignore", message=r".*will be removed in v6.*",
                                category=FutureWarning)
        return _finetune(opts, on_event, command)


def _finetune(opts: FinetuneOptions, on_event: Callable[[Event], None] | None,
              command: str | None) -> FinetuneResult:
    started = time.time()
    output = Path(opts.output_dir).expanduser() if opts.output_dir else default_output_dir(
        opts.model, opts.data)
    output = output.absolute()
    checkpoints = checkpoint_dir_for(output)

    # 1. Inputs and the output directory, before anything heavy runs or anything is written.
    if STDIN in (*opts.data, opts.validation_file) and launched_processes() > 1:
        raise UsageError("stdin ('-') reaches only one of the launched processes",
                         hint="save the text to a file and pass the file")
    sources = check_sources(opts.data, opts.text_field)
    validation = check_sources([opts.validation_file], opts.text_field) \
        if opts.validation_file else []
    resume_from = check_output(opts, output)
    precision, use_cpu = resolve_precision(opts.precision, opts.device)
    report_to = _check_report_to(opts.report_to)

    # 2. The model, through the same resolution as every other command (default, builtin, gguf).
    from nlgen.models import DEFAULT_MODEL, load_model

    lm = load_model(opts.model, device="cpu", dtype="float32",
                    trust_remote_code=opts.trust_remote_code, purpose="train")
    if not opts.output_dir and lm.model_id != (opts.model or DEFAULT_MODEL):
        # The default model fell back to builtin: name the output after what is trained.
        output = default_output_dir(lm.model_id, opts.data).absolute()
        checkpoints = checkpoint_dir_for(output)
        resume_from = check_output(opts, output)
    context = lm.context_length
    block_size = opts.block_size or min(context, MAX_DEFAULT_BLOCK)
    if block_size > context:
        raise UsageError(f"--block-size {block_size} is larger than the model's context "
                         f"({context} tokens)", hint=f"use --block-size {context} or less")
    model, tokenizer = lm.model, lm.tokenizer
    if opts.gradient_checkpointing:
        model.config.use_cache = False  # the cache is useless in training and clashes with it
    if opts.lora:
        model = _wrap_lora(model, opts)

    # 3. Data, tokenized and packed once (the main process first; the others read its cache).
    from transformers import Trainer, TrainingArguments, default_data_collator

    if opts.overwrite and checkpoints.exists() and is_main_process():
        shutil.rmtree(checkpoints)
    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size,
        num_train_epochs=opts.epochs if opts.epochs is not None else 3.0,
        max_steps=opts.max_steps if opts.max_steps is not None else -1,
        learning_rate=opts.resolved_learning_rate,
        weight_decay=opts.weight_decay,
        warmup_steps=opts.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        seed=opts.seed,
        data_seed=opts.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=use_cpu,
        activation_checkpointing=opts.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        # Loss only: evaluation never keeps (batch, block, vocab) logits around.
        prediction_loss_only=True,
        eval_accumulation_steps=1,
        logging_strategy="steps",
        logging_steps=opts.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=opts.save_total_limit,
        report_to=report_to or "none",
        include_num_input_tokens_seen="all",
        disable_tqdm=True,  # progress is ours
        log_level="error",
        log_level_replica="error",
        eval_strategy="epoch" if validation or opts.split > 0 else "no",
        dataloader_num_workers=0,
    )
    data = prepare_data(sources, validation, opts, tokenizer, block_size,
                        lambda: args.main_process_first(desc="tokenizing"))
    if data.block_size != block_size:
        block_size = data.block_size

    # 4. The run.
    interrupt = _Interrupt()
    callback = _make_callback(on_event, interrupt, opts, tokenizer)
    trainer = Trainer(model=model, args=args, train_dataset=data.train,
                      eval_dataset=data.validation, data_collator=default_data_collator,
                      processing_class=tokenizer, callbacks=[callback])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints log dicts to stdout

    if on_event is not None and trainer.is_world_process_zero():
        steps = _planned_steps(data, opts, args.world_size)
        on_event(Started(lm.name, len(data.train),
                         len(data.validation) if data.validation is not None else 0,
                         block_size, steps, precision, str(args.device), args.world_size,
                         output, checkpoints,
                         _checkpoint_step(resume_from) if resume_from else None))
    before = None
    if data.validation is not None:
        if resume_from is None:
            before = trainer.evaluate()["eval_loss"]
            if trainer.is_world_process_zero():
                checkpoints.mkdir(parents=True, exist_ok=True)
                (checkpoints / STATE).write_text(json.dumps({"before_loss": before}))
        else:
            state = checkpoints / STATE
            before = json.loads(state.read_text())["before_loss"] if state.is_file() else None
    with interrupt:
        train_out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if callback.stopped_at is not None:
        raise TrainingInterrupted(callback.stopped_at,
                                  checkpoints / f"checkpoint-{callback.stopped_at}")

    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    after = None
    if data.validation is not None:
        if evals and evals[-1].get("step") == trainer.state.global_step:
            after = evals[-1]["eval_loss"]
        else:
            callback.phase = "end"
            after = trainer.evaluate()["eval_loss"]
            evals = [e for e in trainer.state.log_history if "eval_loss" in e]

    # 5. The model directory: a temporary sibling, renamed into place when complete.
    record = {
        "nlgen_version": _version("nlgen"),
        "transformers_version": _version("transformers"),
        "torch_version": _version("torch"),
        "command": command,
        "base_model": {"name": lm.name, "source": lm.source},
        "data": [{"path": s.name, "sha256": s.sha256, "bytes": s.size} for s in sources],
        "validation": (
            {"file": validation[0].name, "sha256": validation[0].sha256}
            if validation else {"split": opts.split} if data.validation is not None
            else None),
        "hyperparameters": {
            **_jsonable(asdict(opts)), "learning_rate": opts.resolved_learning_rate,
            "block_size": block_size, "precision": precision,
        },
        "train_blocks": len(data.train),
        "validation_blocks": len(data.validation) if data.validation is not None else 0,
        "training_text_tokens": data.train_tokens,
        "world_size": args.world_size,
        "device": str(args.device),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "train_runtime_s": train_out.metrics.get("train_runtime"),
        "train_tokens_per_second": _rate(trainer, train_out, callback),
        "final_train_loss": callback.loss,
        "validation_perplexity": {
            "before": perplexity(before) if before is not None else None,
            "after": perplexity(after) if after is not None else None,
            "evaluations": [{"step": e["step"], "epoch": e.get("epoch"),
                             "perplexity": perplexity(e["eval_loss"])} for e in evals],
        },
        "resumed_from_step": _checkpoint_step(resume_from) if resume_from else None,
        "lora": ({"r": opts.lora_r, "alpha": opts.lora_alpha, "dropout": opts.lora_dropout,
                  "target": list(opts.lora_target) or None, "merged": opts.merge}
                 if opts.lora else None),
        "wall_time_s": None,
    }
    main = trainer.is_world_process_zero()
    tmp = output.with_name(f".{output.name}.partial")
    if main and tmp.exists():
        shutil.rmtree(tmp)  # what a crash left behind
    trainer.accelerator.wait_for_everyone()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the Trainer turned transformers' bars back on
    if not (opts.lora and opts.merge):
        # Every process takes part: under FSDP or DeepSpeed the weights are gathered from all
        # of them; the main process alone writes.
        trainer.save_model(str(tmp))
    if main:
        _finish_output(trainer, tokenizer, opts, output, tmp, record, started, checkpoints)
    trainer.accelerator.wait_for_everyone()
    return FinetuneResult(output, record, main)


def _planned_steps(data: PackedData, opts: FinetuneOptions, world_size: int) -> int:
    if opts.max_steps:
        return opts.max_steps
    batches = math.ceil(len(data.train) / (opts.batch_size * world_size))
    per_epoch = max(1, math.ceil(batches / opts.gradient_accumulation_steps))
    return math.ceil(per_epoch * (opts.epochs if opts.epochs is not None else 3.0))


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _rate(trainer, train_out, callback) -> float | None:
    runtime = train_out.metrics.get("train_runtime")
    tokens = trainer.state.num_input_tokens_seen - callback.tokens_at_start
    return tokens / runtime if runtime else None


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _wrap_lora(model, opts: FinetuneOptions):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", r=opts.lora_r, lora_alpha=opts.lora_alpha,
                        lora_dropout=opts.lora_dropout,
                        target_modules=list(opts.lora_target) or None)
    try:
        with warnings.catch_warnings():
            # peft tells that it switched GPT-2's Conv1D layers to fan_in_fan_out: as it should.
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            return get_peft_model(model, config)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"cannot apply LoRA to this model: {first}",
                         hint="name the layers to adapt with --lora-target") from None


def _finish_output(trainer, tokenizer, opts: FinetuneOptions, output: Path, tmp: Path,
                   record: dict[str, Any], started: float, checkpoints: Path) -> None:
    if opts.lora and opts.merge:
        # Merging folds B @ A into the base weights: a plain model every loader understands.
        trainer.model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the record says it all
    tokenizer.save_pretrained(tmp)
    runs = checkpoints / "runs"
    if runs.is_dir():  # tensorboard logs belong with the model
        shutil.move(str(runs), str(tmp / "runs"))
    record["wall_time_s"] = round(time.time() - started, 3)
    (tmp / RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                              encoding="utf-8")
    if output.exists():  # --overwrite: the old directory goes only once the new one is whole
        trash = output.with_name(f".{output.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(output, trash)
        os.replace(tmp, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, output)
    if not opts.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
