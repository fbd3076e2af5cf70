"""``nlgen finetune``: text in, a fine-tuned model directory out."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated, Any

import typer

from nlgen.cli.options import BatchSizeOpt, ModelOpt, SeedOpt, TrustRemoteCodeOpt, VerboseOpt
from nlgen.cli.runtime import guard

DATA = "Data"
TRAIN = "Training (TrainingArguments)"
LORA = "LoRA (peft)"
OUT = "Output, checkpoints and progress"


@guard
def finetune(
    data: Annotated[list[str], typer.Argument(
        help=".txt, .jsonl or .csv files, directories of text files, or '-' (stdin).",
        show_default=False)],
    model: ModelOpt = None,
    output_dir: Annotated[str | None, typer.Option(
        "--output-dir", "-o", help="Where the model goes [default: MODEL-DATA-finetuned].",
        show_default=False, rich_help_panel=OUT)] = None,
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
    validation_file: Annotated[str | None, typer.Option(
        "--validation-file", help="Text to measure perplexity on (instead of a split).",
        rich_help_panel=DATA)] = None,
    validation_split: Annotated[float | None, typer.Option(
        "--validation-split", help="Share of the blocks held out [default: 0.05, at least one "
        "block; 0: none].", show_default=False, rich_help_panel=DATA)] = None,
    block_size: Annotated[int | None, typer.Option(
        "--block-size", help="Tokens per training sequence [default: the model's context, at "
        "most 1024].", show_default=False, rich_help_panel=DATA)] = None,
    epochs: Annotated[float | None, typer.Option(
        "--epochs", help="Passes over the data [default: 3].", show_default=False,
        rich_help_panel=TRAIN)] = None,
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", help="Optimizer steps (instead of --epochs).",
        rich_help_panel=TRAIN)] = None,
    learning_rate: Annotated[float | None, typer.Option(
        "--learning-rate", "--lr", help="Peak learning rate [default: 5e-5; 2e-4 with --lora].",
        show_default=False, rich_help_panel=TRAIN)] = None,
    batch_size: BatchSizeOpt = 4,
    gradient_accumulation_steps: Annotated[int, typer.Option(
        "--gradient-accumulation-steps", help="Micro-batches per optimizer step.",
        rich_help_panel=TRAIN)] = 1,
    warmup_ratio: Annotated[float, typer.Option(
        "--warmup-ratio", help="Share of the steps for linear warm-up.",
        rich_help_panel=TRAIN)] = 0.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", rich_help_panel=TRAIN)] = 0.0,
    seed: SeedOpt = None,
    precision: Annotated[str, typer.Option(
        "--precision", help="auto, fp32, bf16 or fp16 (auto: bf16/fp16 on a GPU, fp32 on CPU).",
        rich_help_panel=TRAIN)] = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Recompute activations: less memory, ~20% slower.",
        rich_help_panel=TRAIN)] = False,
    device: Annotated[str, typer.Option(
        "--device", help="auto, cpu or cuda (several GPUs: accelerate launch, see README).",
        rich_help_panel=TRAIN)] = "auto",
    lora: Annotated[bool, typer.Option(
        "--lora", help="Train LoRA adapters instead of all weights.",
        rich_help_panel=LORA)] = False,
    lora_r: Annotated[int, typer.Option("--lora-r", rich_help_panel=LORA)] = 8,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", rich_help_panel=LORA)] = 16,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", rich_help_panel=LORA)] = 0.05,
    lora_target: Annotated[list[str] | None, typer.Option(
        "--lora-target", help="Module names to adapt, repeatable or comma-separated "
        "[default: peft's choice for the architecture].", show_default=False,
        rich_help_panel=LORA)] = None,
    merge: Annotated[bool, typer.Option(
        "--merge/--no-merge", help="Save the adapters merged into the weights, or on their own.",
        rich_help_panel=LORA)] = True,
    sample_every: Annotated[int, typer.Option(
        "--sample-every", help="Print a short sample every N steps (0: never).",
        rich_help_panel=OUT)] = 0,
    sample_prompt: Annotated[str, typer.Option(
        "--sample-prompt", help="Prompt of those samples [default: none, an unconditional "
        "sample].", show_default=False, rich_help_panel=OUT)] = "",
    logging_steps: Annotated[int, typer.Option(
        "--logging-steps", help="Log the loss every N steps.", rich_help_panel=OUT)] = 10,
    save_steps: Annotated[int, typer.Option(
        "--save-steps", help="Checkpoint every N steps.", rich_help_panel=OUT)] = 500,
    save_total_limit: Annotated[int, typer.Option(
        "--save-total-limit", help="Checkpoints kept.", rich_help_panel=OUT)] = 2,
    report_to: Annotated[list[str] | None, typer.Option(
        "--report-to", help="tensorboard, wandb, mlflow, ... when installed (repeatable).",
        show_default=False, rich_help_panel=OUT)] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fine-tune a language model on your text; write a model directory.

    The directory loads like any other: nlgen generate --model DIR.

    Examples:

      nlgen finetune notes.txt --model builtin --epochs 1

      nlgen finetune chats.jsonl --text-field body --max-steps 200 -o my-model

      nlgen finetune docs/ --lora --sample-every 50 --sample-prompt "Dear"

      accelerate launch --num_processes 2 -m nlgen finetune data.txt -o my-model
    """
    import logging

    from nlgen import training

    main = training.is_main_process()
    if not main:  # the other ranks of `accelerate launch` train silently
        logging.getLogger("nlgen").setLevel(logging.ERROR)
    targets = tuple(t.strip() for item in lora_target or () for t in item.split(",") if t.strip())
    opts = training.FinetuneOptions(
        data=tuple(data), model=model, output_dir=output_dir, overwrite=overwrite, resume=resume,
        keep_checkpoints=keep_checkpoints, line_by_line=line_by_line, text_field=text_field,
        validation_file=validation_file, validation_split=validation_split,
        block_size=block_size, epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
        batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        warmup_ratio=warmup_ratio, weight_decay=weight_decay,
        seed=42 if seed is None else seed, precision=precision,
        gradient_checkpointing=gradient_checkpointing, device=device, lora=lora, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target=targets, merge=merge,
        sample_every=sample_every, sample_prompt=sample_prompt, logging_steps=logging_steps,
        save_steps=save_steps, save_total_limit=save_total_limit,
        report_to=tuple(report_to or ()), trust_remote_code=trust_remote_code,
    )
    command = _command()
    with _Renderer(enabled=main) as render:
        try:
            result = training.finetune(opts, on_event=render, command=command)
        except training.TrainingInterrupted as exc:
            again = command if "--resume" in command.split() else command + " --resume"
            exc.hint = f"resume with: {again}"
            raise
    if not result.is_main_process:
        return
    from nlgen import output

    _summary(result.record, str(result.output_dir))
    output.write(f"{result.output_dir}\n")


def _command() -> str:
    """The command line as the user typed it (under accelerate launch: as a launch command)."""
    from nlgen.training import launched_processes

    args = sys.argv[1:]
    if launched_processes() > 1:
        return "accelerate launch -m nlgen " + shlex.join(args)
    return "nlgen " + shlex.join(args)


def _summary(record: dict[str, Any], path: str) -> None:
    from nlgen import output

    ppl = record.get("validation_perplexity") or {}
    before, after = ppl.get("before"), ppl.get("after")
    measured = (f"validation perplexity {before:.2f} -> {after:.2f}; "
                if before is not None and after is not None else "")
    output.notice(f"saved {path}: {measured}{record['steps']} steps, {record['tokens_seen']:,} "
                  f"tokens in {record['wall_time_s']:.1f} s")


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Renderer:
    """Training events -> a rich progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, enabled: bool) -> None:
        from nlgen import output

        self.enabled = enabled
        self.console = output.stderr_console()
        self.live = enabled and output.progress_enabled()
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> _Renderer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def _start_bar(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.fields[info]}"), console=self.console,
                                 transient=False)
        self.task = self.progress.add_task("train", total=total, info="")
        self.progress.start()

    def _print(self, text: str) -> None:
        from rich.markup import escape

        self.console.print(escape(text))

    def __call__(self, event: Any) -> None:
        from nlgen import training

        if not self.enabled:
            return
        if isinstance(event, training.Started):
            resumed = (f", resuming at step {event.resumed_from}"
                       if event.resumed_from is not None else "")
            self._print(f"finetune {event.model} on {event.device} ({event.precision}, "
                        f"{event.world_size} process(es)): {event.train_blocks} training and "
                        f"{event.validation_blocks} validation blocks of {event.block_size} "
                        f"tokens, {event.max_steps} steps{resumed}")
            if self.live:
                self._start_bar(event.max_steps)
        elif isinstance(event, training.Progress):
            info = (f"epoch {event.epoch:.2f}"
                    + (f"  loss {event.loss:.4f}" if event.loss is not None else "")
                    + (f"  lr {event.learning_rate:.2e}" if event.learning_rate is not None
                       else "")
                    + f"  {event.tokens_per_second:,.0f} tok/s  left {_clock(event.eta_seconds)}")
            if self.progress is not None:
                self.progress.update(self.task, completed=event.step, info=info)
            elif event.logged:
                self._print(f"step {event.step}/{event.max_steps}  {info}")
        elif isinstance(event, training.Evaluation):
            label = {"before": "before training", "epoch": f"epoch {event.epoch:.2f}",
                     "end": "end"}[event.when]
            self._print(f"validation perplexity ({label}, step {event.step}): "
                        f"{event.perplexity:.3f}")
        elif isinstance(event, training.Sample):
            self._print(f"sample at step {event.step}: {event.text!r}")
