"""Fine-tuning: options -> data (checks, packing) -> a Trainer run -> an atomic model directory.

Built on transformers' ``Trainer`` (README, "Design notes", says why not a hand-written loop).
Rooms: ``options`` (what is asked), ``data`` (texts -> packed blocks), ``chat`` (records:
formats, checks, loss masks from the chat template), ``examples`` (records -> one padded
sequence per example), ``callback`` (events, samples, Ctrl-C), ``artifacts`` (output
directory, checkpoints, run record), ``curve`` (loss.csv, loss.png), ``run`` (the order of it
all), ``events`` (what the caller is told), ``divergence`` (KL against the base, through
score's comparison). Importing this package loads no torch.

May import: jobs (ranks), score, models, and errors, inputs, batching, jsonl. Not cli.
"""

from nlgen.finetune.events import (
    Evaluation,
    Event,
    FinetuneResult,
    Sample,
    Started,
    StepProgress,
    TrainingInterrupted,
)
from nlgen.finetune.options import FinetuneOptions
from nlgen.finetune.run import finetune

__all__ = ["Evaluation", "Event", "FinetuneOptions", "FinetuneResult", "Sample", "Started",
           "StepProgress", "TrainingInterrupted", "finetune"]
