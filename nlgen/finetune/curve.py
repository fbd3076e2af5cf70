"""The loss curve a run leaves in its output directory: ``loss.csv`` and ``loss.png``.

The rows come from the Trainer's log history (restored from the checkpoint on a resumed run,
so a resumed run's curve starts at step 1 too): the training loss each ``--logging-steps``
(its mean over those steps), and the validation loss where it was measured (before training
at step 0, each epoch or ``--eval-steps``, and at the end). The picture is drawn with
matplotlib's Agg canvas (no display, no pyplot state), imported only here.

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("nlgen")

CSV, PNG = "loss.csv", "loss.png"
COLUMNS = ("step", "epoch", "train_loss", "validation_loss", "learning_rate")


def loss_rows(log_history: list[dict[str, Any]], before: float | None) -> list[dict[str, Any]]:
    """One row per step that logged a loss, in step order; None where nothing was measured."""
    rows: dict[int, dict[str, Any]] = {}

    def row(step: int, epoch: Any) -> dict[str, Any]:
        return rows.setdefault(step, {"step": step, "epoch": epoch, "train_loss": None,
                                      "validation_loss": None, "learning_rate": None})

    if before is not None:
        row(0, 0.0)["validation_loss"] = before
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        if "loss" in entry:
            r = row(step, entry.get("epoch"))
            r["train_loss"], r["learning_rate"] = entry["loss"], entry.get("learning_rate")
        if "eval_loss" in entry:
            row(step, entry.get("epoch"))["validation_loss"] = entry["eval_loss"]
    return [rows[s] for s in sorted(rows)]


def write_loss_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        for r in rows:
            out.writerow(["" if r[c] is None else _cell(r[c]) for c in COLUMNS])


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def plot_loss(path: Path, rows: list[dict[str, Any]], title: str,
              logging_steps: int) -> bool:
    """Draw the curve into ``path``; False (and a warning) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: %s not drawn (the numbers are in %s)",
                    PNG, CSV)
        return False
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = [(r["step"], r["train_loss"]) for r in rows if r["train_loss"] is not None]
    val = [(r["step"], r["validation_loss"]) for r in rows if r["validation_loss"] is not None]
    if train:
        ax.plot(*zip(*train), marker="." if len(train) < 30 else None,
                label=f"training (mean of {logging_steps} step{'s' * (logging_steps > 1)})")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if train or val:
        ax.legend()
    fig.savefig(path, dpi=120)
    return True


def write_curve(directory: Path, rows: list[dict[str, Any]], title: str,
                logging_steps: int) -> dict[str, str | None]:
    """``loss.csv`` and ``loss.png`` in ``directory``; their names, for the run record."""
    write_loss_csv(directory / CSV, rows)
    drawn = plot_loss(directory / PNG, rows, title, logging_steps)
    return {"csv": CSV, "png": PNG if drawn else None}
