"""``nlgen finetune``: text in, a fine-tuned model directory out."""

from __future__ import annotations

import logging
import shlex
import sys
from enum import Enum
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import TextColumn

from nlgen.cli import console
from nlgen.cli.options import (
    BatchSizeOpt,
    ModelOpt,
    Precision,
    QuietOpt,
    SeedOpt,
    TrainDevice,
    TrustRemoteCodeOpt,
    VerboseOpt,
)
from nlgen.cli.runtime import guard
from nlgen.finetune import (
    Evaluation,
    Event,
    FinetuneOptions,
    Sample,
    Started,
    StepProgress,
    TrainingInterrupted,
)
from nlgen.finetune import (
    finetune as run_finetune,
)
from nlgen.finetune.options import DEFAULT_EPOCHS, DEFAULT_VALIDATION_SPLIT
from nlgen.jobs import distributed

DATA = "Data"
TRAIN = "Training (TrainingArguments)"
LORA = "LoRA (peft)"
OUT = "Output, checkpoints and progress"


class FinetuneInput(str, Enum):
    """--input-format: auto tells a .jsonl file's format by its first record's keys."""

    auto = "auto"
    text = "text"
    messages = "messages"
    prompt_completion = "prompt-completion"


class TrainOn(str, Enum):
    completion = "completion"
    all = "all"


@guard
def finetune(
    ctx: typer.Context,
    data: Annotated[list[str], typer.Argument(
        help=".txt, .jsonl or .csv files, directories of text files, or '-' (stdin).",
        show_default=False)],
    model: ModelOpt = None,
    output_dir: Annotated[str | None, typer.Option(
        "--output-dir", "-o", help="Where the model goes.",
        show_default="MODEL-DATA-finetuned", rich_help_panel=OUT)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing output directory (and stale checkpoints).",
        rich_help_panel=OUT)] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the last checkpoint of an interrupted run.",
        rich_help_panel=OUT)] = False,
    keep_checkpoints: Annotated[bool, typer.Option(
        "--keep-checkpoints", help="Keep OUTPUT.checkpoints after a successful run.",
        rich_help_panel=OUT)] = False,
    line_by_line: Annotated[bool, typer.Option(
        "--line-by-line", help="Each line of a text input is a document (default: each file).",
        rich_help_panel=DATA)] = False,
    text_field: Annotated[str, typer.Option(
        "--text-field", help="The .jsonl / .csv field holding the text.",
        rich_help_panel=DATA)] = "text",
    input_format: Annotated[FinetuneInput, typer.Option(
        "--input-format", help="text; messages: {\"messages\": [{role, content}, ...]}; "
        "prompt-completion: {\"prompt\", \"completion\"} (auto: by a .jsonl file's first "
        "record).", rich_help_panel=DATA)] = FinetuneInput.auto,
    train_on: Annotated[TrainOn, typer.Option(
        "--train-on", help="completion: the loss covers the assistant replies (weight 1) or "
        "the completion only; all: every token.", rich_help_panel=DATA)] = TrainOn.completion,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="Leave bad records out (counted) instead of stopping.",
        rich_help_panel=DATA)] = False,
    validation_file: Annotated[str | None, typer.Option(
        "--validation-file", help="Data to measure the loss on (instead of a split).",
        rich_help_panel=DATA)] = None,
    validation_split: Annotated[float | None, typer.Option(
        "--validation-split", help="Share of the blocks or records held out (at least one; "
        "0: none).",
        show_default=str(DEFAULT_VALIDATION_SPLIT), rich_help_panel=DATA)] = None,
    block_size: Annotated[int | None, typer.Option(
        "--block-size", help="Tokens per training sequence (records: at most; longer ones "
        "are cut).",
        show_default="the model's context, at most 1024", rich_help_panel=DATA)] = None,
    epochs: Annotated[float | None, typer.Option(
        "--epochs", help="Passes over the data.", show_default=f"{DEFAULT_EPOCHS:g}",
        rich_help_panel=TRAIN)] = None,
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", help="Optimizer steps (instead of --epochs).",
        rich_help_panel=TRAIN)] = None,
    learning_rate: Annotated[float | None, typer.Option(
        "--learning-rate", "--lr", help="Peak learning rate.",
        show_default="5e-5; 2e-4 with --lora", rich_help_panel=TRAIN)] = None,
    batch_size: BatchSizeOpt = 4,
    gradient_accumulation_steps: Annotated[int, typer.Option(
        "--gradient-accumulation-steps", help="Micro-batches per optimizer step.",
        rich_help_panel=TRAIN)] = 1,
    warmup_ratio: Annotated[float, typer.Option(
        "--warmup-ratio", help="Share of the steps for linear warm-up.",
        rich_help_panel=TRAIN)] = 0.0,
    weight_decay: Annotated[float, typer.Option(
        "--weight-decay", help="AdamW weight decay.", rich_help_panel=TRAIN)] = 0.0,
    seed: SeedOpt = None,
    precision: Annotated[Precision, typer.Option(
        "--precision", help="Mixed precision; weights stay float32 (auto: bf16/fp16 on a GPU; "
        "bf16 on a CPU with native bfloat16 (AVX512-BF16, AMX), else fp32).",
        rich_help_panel=TRAIN)] = Precision.auto,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Recompute activations: less memory, ~20% slower.",
        rich_help_panel=TRAIN)] = False,
    device: Annotated[TrainDevice, typer.Option(
        "--device", help="Where to train (several GPUs: accelerate launch, see README).",
        rich_help_panel=TRAIN)] = TrainDevice.auto,
    lora: Annotated[bool, typer.Option(
        "--lora", help="Train LoRA adapters instead of all weights.",
        rich_help_panel=LORA)] = False,
    lora_r: Annotated[int, typer.Option(
        "--lora-r", help="Rank of the adapters.", rich_help_panel=LORA)] = 8,
    lora_alpha: Annotated[int, typer.Option(
        "--lora-alpha", help="Scale of the adapters (alpha / r).", rich_help_panel=LORA)] = 16,
    lora_dropout: Annotated[float, typer.Option(
        "--lora-dropout", help="Dropout on the adapters' input.", rich_help_panel=LORA)] = 0.05,
    lora_target: Annotated[list[str] | None, typer.Option(
        "--lora-target", help="Module names to adapt, repeatable or comma-separated.",
        show_default="peft's choice for the architecture", rich_help_panel=LORA)] = None,
    merge: Annotated[bool, typer.Option(
        "--merge/--no-merge", help="Save the adapters merged into the weights, or on their own.",
        rich_help_panel=LORA)] = True,
    sample_every: Annotated[int, typer.Option(
        "--sample-every", help="Print a short sample every N steps (0: never).",
        rich_help_panel=OUT)] = 0,
    sample_prompt: Annotated[str, typer.Option(
        "--sample-prompt", help="Prompt of those samples.",
        show_default="none: an unconditional sample", rich_help_panel=OUT)] = "",
    logging_steps: Annotated[int, typer.Option(
        "--logging-steps", help="Log the loss every N steps.", rich_help_panel=OUT)] = 10,
    eval_steps: Annotated[int | None, typer.Option(
        "--eval-steps", help="Measure the validation loss every N steps.",
        show_default="each epoch, and at the end", rich_help_panel=OUT)] = None,
    save_steps: Annotated[int, typer.Option(
        "--save-steps", help="Checkpoint every N steps.", rich_help_panel=OUT)] = 500,
    save_total_limit: Annotated[int, typer.Option(
        "--save-total-limit", help="Checkpoints kept.", rich_help_panel=OUT)] = 2,
    report_to: Annotated[list[str] | None, typer.Option(
        "--report-to", help="tensorboard, wandb, mlflow, ... when installed (repeatable).",
        show_default=False, rich_help_panel=OUT)] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a language model on your text; write a model directory.

    The directory loads like any other: nlgen generate --model DIR.

    Examples:

      nlgen finetune notes.txt --model builtin --epochs 1

      nlgen finetune chats.jsonl --model builtin -o my-chat   (messages: trains on the replies)

      nlgen finetune notes.jsonl --text-field body --max-steps 200 -o my-model

      nlgen finetune docs/ --lora --sample-every 50 --sample-prompt "Dear"

      accelerate launch --num_processes 2 -m nlgen finetune data.txt -o my-model
    """
    is_main = distributed.is_main_process()
    if not is_main:  # the other ranks of `accelerate launch` train silently
        logging.getLogger("nlgen").setLevel(logging.ERROR)
    targets = tuple(t.strip() for item in lora_target or () for t in item.split(",") if t.strip())
    opts = FinetuneOptions(
        data=tuple(data), model=model, output_dir=output_dir, overwrite=overwrite, resume=resume,
        keep_checkpoints=keep_checkpoints, line_by_line=line_by_line, text_field=text_field,
        input_format=input_format.value, train_on=train_on.value, skip_bad=skip_bad,
        validation_file=validation_file, validation_split=validation_split,
        block_size=block_size, epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
        batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        warmup_ratio=warmup_ratio, weight_decay=weight_decay,
        seed=42 if seed is None else seed, precision=precision.value,
        gradient_checkpointing=gradient_checkpointing, device=device.value, lora=lora,
        lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target=targets,
        merge=merge, sample_every=sample_every, sample_prompt=sample_prompt,
        logging_steps=logging_steps, eval_steps=eval_steps, save_steps=save_steps,
        save_total_limit=save_total_limit,
        report_to=tuple(report_to or ()), trust_remote_code=trust_remote_code,
    )
    command = command_line(sys.argv[1:])
    with _Renderer(enabled=is_main) as render:
        try:
            result = run_finetune(opts, on_event=render, command=command)
        except TrainingInterrupted as exc:
            exc.hint = f"resume with: {resume_command(command)}"
            raise
    if not result.is_main_process:
        return
    ppl = result.record.get("validation_perplexity") or {}
    before, after = ppl.get("before"), ppl.get("after")
    kl = result.record.get("validation_kl")
    measured = (f"validation perplexity {before:.2f} -> {after:.2f}"
                + (f", KL from the base {kl:.4f} nats/token" if kl is not None else "") + "; "
                if before is not None and after is not None else "")
    examples = result.record.get("examples")
    trained = (f" ({console.plural(examples['train']['trained_tokens'], 'trained token')} "
               f"a pass, {examples['train']['masked_tokens']:,} masked)" if examples else "")
    console.notice(f"saved {result.output_dir}: {measured}"
                   f"{console.plural(result.record['steps'], 'step')}, "
                   f"{console.plural(result.record['tokens_seen'], 'token')}{trained} in "
                   f"{result.record['wall_time_s']:.1f} s")
    curve = result.record.get("loss_curve") or {}
    drawn = [str(result.output_dir / name) for name in (curve.get("csv"), curve.get("png"))
             if name]
    if drawn:
        console.notice("loss per step: " + ", ".join(drawn))
    console.write(f"{result.output_dir}\n")


def command_line(args: list[str]) -> str:
    """The command line as the user typed it (under a launcher: as an accelerate launch)."""
    if distributed.world_size() > 1:
        return "accelerate launch -m nlgen " + shlex.join(args)
    return "nlgen " + shlex.join(args)


def resume_command(command: str) -> str:
    """The command that continues an interrupted run: the same one, with --resume instead of
    --overwrite (which would start over, and which --resume refuses)."""
    words = [w for w in shlex.split(command) if w != "--overwrite"]
    if "--resume" not in words:
        words.append("--resume")
    return shlex.join(words)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Renderer:
    """Training events -> a rich progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.live = enabled and console.progress_enabled()
        self.bar: console.ProgressBar | None = None

    def __enter__(self) -> _Renderer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        if isinstance(event, Started):
            resumed = (f", resuming at step {event.resumed_from}"
                       if event.resumed_from is not None else "")
            what = (f"validation blocks of {event.block_size} tokens"
                    if event.data_format == "text" else
                    f"validation examples ({event.data_format}, at most {event.block_size} "
                    "tokens each)")
            console.say(f"finetune {event.model} on {event.device} ({event.precision}, "
                        f"{console.plural(event.world_size, 'process', 'processes')}): "
                        f"{event.train_blocks} training and {event.validation_blocks} "
                        f"{what}, {console.plural(event.max_steps, 'step')}{resumed}")
            if self.live:
                self.bar = console.ProgressBar("step", TextColumn("{task.fields[info]}"),
                                               transient=False)
        elif isinstance(event, StepProgress):
            info = (f"epoch {event.epoch:.2f}"
                    + (f"  loss {event.loss:.4f}" if event.loss is not None else "")
                    + (f"  lr {event.learning_rate:.2e}" if event.learning_rate is not None
                       else "")
                    + f"  {event.tokens_per_second:,.0f} tok/s  left {_clock(event.eta_seconds)}")
            if self.bar is not None:
                self.bar.update(event.step, event.max_steps, info=escape(info))
            elif event.logged:
                console.say(f"step {event.step}/{event.max_steps}  {info}")
        elif isinstance(event, Evaluation):
            label = {"before": "before training", "epoch": f"epoch {event.epoch:.2f}",
                     "end": "end"}[event.when]
            console.say(f"validation perplexity ({label}, step {event.step}): "
                        f"{event.perplexity:.3f}")
        elif isinstance(event, Sample):
            console.say(f"sample at step {event.step}: {event.text!r}")
