"""What a run tells its caller while it goes (events) and when it ends (result or interruption).

The core never prints: the CLI renders these events (a progress bar, log lines).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlgen.errors import EXIT_INTERRUPTED, NlgenError


@dataclass(frozen=True)
class StepProgress:
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
    data_format: str = "text"  # text: packed blocks; records (messages, ...): one per example


Event = StepProgress | Evaluation | Sample | Started


@dataclass
class FinetuneResult:
    output_dir: Path
    record: dict[str, Any] = field(default_factory=dict)
    is_main_process: bool = True


class TrainingInterrupted(NlgenError):
    """Ctrl-C during training: a checkpoint was saved; the CLI adds the command that resumes."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved in {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint
