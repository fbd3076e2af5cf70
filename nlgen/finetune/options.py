"""What a fine-tuning run is asked to do: one frozen dataclass, checked when it is built."""

from __future__ import annotations

from dataclasses import dataclass

from nlgen.errors import UsageError
from nlgen.finetune.chat import INPUT_FORMATS, TRAIN_ON
from nlgen.inputs import STDIN

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")  # which GPU: CUDA_VISIBLE_DEVICES or the launcher
DEFAULT_EPOCHS = 3.0  # run_clm's default
DEFAULT_VALIDATION_SPLIT = 0.05


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
    input_format: str = "auto"  # auto | text | messages | prompt-completion (chat.INPUT_FORMATS)
    train_on: str = "completion"  # completion: assistant replies / completions only; all
    skip_bad: bool = False  # leave bad records out (counted) instead of refusing the run
    validation_file: str | None = None
    validation_split: float | None = None  # share of the packed blocks, or of the records
    # (None: 5%, at least one; 0: no validation). Not with validation_file.
    block_size: int | None = None  # None: the model's context, capped at 1024
    # training
    epochs: float | None = None  # None and no max_steps: DEFAULT_EPOCHS
    max_steps: int | None = None
    learning_rate: float | None = None  # None: 5e-5, or 2e-4 with LoRA
    batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    seed: int = 42
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (mixed precision; weights stay fp32)
    gradient_checkpointing: bool = False
    device: str = "auto"  # one of DEVICES
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
    eval_steps: int | None = None  # validation loss every N steps too (None: each epoch)
    save_steps: int = 500
    save_total_limit: int = 2
    report_to: tuple[str, ...] = ()
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.data:
            raise UsageError("no training data given", hint="nlgen finetune data.txt")
        self._check_numbers()
        self._check_combinations()

    def _check_numbers(self) -> None:
        if self.epochs is not None and not 0 < self.epochs < float("inf"):
            raise UsageError(f"--epochs must be a positive number, not {self.epochs}")
        positive = {
            "--max-steps": self.max_steps, "--batch-size": self.batch_size,
            "--gradient-accumulation-steps": self.gradient_accumulation_steps,
            "--block-size": self.block_size, "--logging-steps": self.logging_steps,
            "--save-steps": self.save_steps, "--eval-steps": self.eval_steps,
            "--save-total-limit": self.save_total_limit,
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
        if self.learning_rate is not None and not 0 < self.learning_rate < float("inf"):
            raise UsageError(f"--learning-rate must be a positive number, not "
                             f"{self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"--warmup-ratio must be in [0, 1), not {self.warmup_ratio}")
        if not 0 <= self.weight_decay < float("inf"):
            raise UsageError(f"--weight-decay must be a non-negative number, not "
                             f"{self.weight_decay}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1), not {self.lora_dropout}")
        if self.validation_split is not None and not 0 <= self.validation_split < 1:
            raise UsageError(f"--validation-split must be in [0, 1), not {self.validation_split}")
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must be in [0, 2**32), not {self.seed}")

    def _check_combinations(self) -> None:
        if self.epochs is not None and self.max_steps is not None:
            raise UsageError("give --epochs or --max-steps, not both")
        if self.validation_file is not None and self.validation_split is not None:
            raise UsageError("give --validation-file or --validation-split, not both")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown --precision {self.precision!r}",
                             hint="use one of: " + ", ".join(PRECISIONS))
        if self.device not in DEVICES:
            raise UsageError(f"invalid --device {self.device!r} for finetune",
                             hint="use auto, cpu or cuda; choose GPUs with CUDA_VISIBLE_DEVICES "
                             "or accelerate launch")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues a run; --overwrite starts over: pick one")
        if not self.lora and (self.lora_target or not self.merge):
            raise UsageError("--lora-target and --no-merge need --lora")
        if not self.text_field:
            raise UsageError("--text-field must not be empty")
        for name, value, choices in (("--input-format", self.input_format, INPUT_FORMATS),
                                     ("--train-on", self.train_on, TRAIN_ON)):
            if value not in choices:
                raise UsageError(f"unknown {name} {value!r}",
                                 hint="use one of: " + ", ".join(choices))
        if self.data.count(STDIN) + (self.validation_file == STDIN) > 1:
            raise UsageError("stdin ('-') can be read only once")

    @property
    def split(self) -> float:
        """The share of packed blocks held out for validation."""
        if self.validation_file is not None:
            return 0.0
        return DEFAULT_VALIDATION_SPLIT if self.validation_split is None else self.validation_split

    @property
    def resolved_epochs(self) -> float:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS

    @property
    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if self.lora else 5e-5  # LoRA's few parameters want larger steps
