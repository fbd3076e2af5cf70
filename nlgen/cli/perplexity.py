"""``nlgen perplexity``: texts in, how likely the model finds them out."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer

from nlgen.cli.options import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    TrustRemoteCodeOpt,
    VerboseOpt,
)
from nlgen.cli.runtime import guard
from nlgen.errors import EXIT_FAILURE, InputError, UsageError

IO = "Input and output"
WINDOW = "Window"

FORMATS = ("auto", "table", "json", "jsonl")
PROGRESS_MIN_TOKENS = 2048  # below this a bar would only flicker


@guard
def perplexity(
    files: Annotated[list[str] | None, typer.Argument(
        help="Text files ('-' is stdin). None: stdin when it is piped.", show_default=False)]
    = None,
    per_line: Annotated[bool, typer.Option(
        "--per-line", help="Score each line on its own (blank lines skipped), one record a line.",
        rich_help_panel=IO)] = False,
    fmt: Annotated[str, typer.Option(
        "--format", help="auto (a table on a terminal, else jsonl), table, json (one object) or "
        "jsonl (one object per input).", rich_help_panel=IO)] = "auto",
    max_length: Annotated[int | None, typer.Option(
        "--max-length", help="Window in tokens (default: the model's context, at most 1024).",
        show_default=False, rich_help_panel=WINDOW)] = None,
    stride: Annotated[int | None, typer.Option(
        "--stride", help="Tokens the window moves (default: half the window); equal to "
        "--max-length gives disjoint windows.", show_default=False,
        rich_help_panel=WINDOW)] = None,
    batch_size: BatchSizeOpt = 8,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustRemoteCodeOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Measure how likely a model finds texts: perplexity, bits per byte, word perplexity.

    Examples:

      nlgen perplexity --model builtin essay.txt

      nlgen perplexity --max-length 512 --stride 256 --format json a.txt b.txt

      nlgen generate -N 8 "The sea" --format jsonl | jq -r .text |
        nlgen perplexity --per-line --format jsonl | jq -s 'sort_by(.perplexity)'
    """
    from nlgen import models, output, scoring

    if fmt not in FORMATS:
        raise UsageError(f"invalid --format {fmt!r}", hint="use " + ", ".join(FORMATS))
    models.check_device_spec(device)
    models.check_dtype_spec(dtype)
    opts = scoring.ScoreOptions(max_length=max_length, stride=stride, batch_size=batch_size)
    sources = _sources(files)
    if fmt == "auto":
        fmt = "table" if output.stdout_is_terminal() else "jsonl"

    lm = models.load_model(model, device=device, dtype=dtype,
                           trust_remote_code=trust_remote_code, purpose="score")
    scorer = scoring.Scorer(lm, opts)
    method = scorer.method
    bar = _Progress() if output.progress_enabled() else None
    results = []
    try:
        for result in scorer.score(scoring.iter_inputs(sources, per_line=per_line),
                                   progress=bar.update if bar else None):
            # stdout carries scores only: an error record without a perplexity would sort first
            # in a `jq sort_by(.perplexity)` ranking. Failures go to stderr, and the exit code.
            if not result.ok:
                output.error(result.error or "", result.hint)
            elif fmt == "jsonl":
                output.write_jsonl(_record(result, lm.name, method, per_line))
            results.append(result)
    finally:
        if bar:
            bar.close()

    if not results:
        raise InputError("no text to score: the input has only blank lines")
    good = [r for r in results if r.ok]
    if fmt == "json":
        output.write(json.dumps(_document(results, lm.name, method, per_line),
                                ensure_ascii=False, indent=2) + "\n")
    elif fmt == "table" and good:
        _print_table(results, lm.name, method)
    if verbose or output.stderr_is_terminal():
        output.notice(f"{lm.name} on {lm.device} ({lm.dtype}): {scorer.scored} tokens scored "
                      f"in {len(good)} of {len(results)} inputs")
    if len(good) < len(results):
        if len(results) > 1:
            what = "lines" if per_line else "inputs"
            output.error(f"{len(results) - len(good)} of {len(results)} {what} could not be "
                         "scored (see above)")
        raise typer.Exit(EXIT_FAILURE)


def _sources(files: list[str] | None) -> list[str]:
    """The inputs: the files given, else stdin when it is piped (a usage error otherwise).

    When no file given exists, fail now rather than after loading a model for nothing (only
    existence is checked: reading here would drain a FIFO such as ``<(producer)``).
    """
    from pathlib import Path

    from nlgen import inputs

    if not files:
        if inputs.stdin_is_terminal():
            raise UsageError("no input given",
                             hint="nlgen perplexity FILE ..., or pipe a text on stdin")
        return [inputs.STDIN]
    if all(f != inputs.STDIN and not Path(f).exists() for f in files):
        inputs.read_text(files[0])  # raises the message a missing file deserves
    return files


# ----------------------------------------------------------------------------- rendering


def _num(x: float) -> float | None:
    """JSON has no inf or nan: an overflowed perplexity is written as null."""
    return x if math.isfinite(x) else None


def _metrics(m: Any) -> dict[str, Any]:
    return {"perplexity": _num(m.perplexity), "nll": _num(m.nll),
            "bits_per_byte": _num(m.bits_per_byte), "word_perplexity": _num(m.word_perplexity),
            "tokens": m.tokens, "bytes": m.bytes, "words": m.words, "nll_sum": m.nll_sum}


def _record(result: Any, model: str, method: Any, per_line: bool) -> dict[str, Any]:
    """One input's record: its numbers, and the method beside them."""
    record: dict[str, Any] = {"input": result.input.name}
    if per_line:
        record["line"] = result.input.line
        record["text"] = result.input.text
    record.update(_metrics(result.metrics))
    record["model"] = model
    record["method"] = {**method.as_dict(), "tokens_scored": result.metrics.tokens,
                        "input_tokens": result.input_tokens, "windows": result.windows}
    return record


def _document(results: list[Any], model: str, method: Any, per_line: bool) -> dict[str, Any]:
    """--format json: the inputs scored, those that failed and why, the total of the first."""
    from nlgen import scoring

    good = [r for r in results if r.ok]
    summed = scoring.total(good)
    failed = []
    for r in results:
        if not r.ok:
            failed.append({"input": r.input.name, **({"line": r.input.line} if per_line else {}),
                           "error": r.error})
    return {
        "model": model,
        "inputs": [_record(r, model, method, per_line) for r in good],
        "failed": failed,
        "total": {**_metrics(summed), "inputs": len(good), "failed": len(results) - len(good),
                  "model": model,
                  "method": {**method.as_dict(), "tokens_scored": summed.tokens}},
    }


def _print_table(results: list[Any], model: str, method: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from nlgen import scoring

    good = [r for r in results if r.ok]
    table = Table(title=f"Perplexity: {model}", title_justify="left")
    widest = max(len(r.input.label) for r in good)
    table.add_column("input", overflow="fold", min_width=min(widest, 32))
    for name in ("ppl", "nll/token", "bits/byte", "word ppl", "tokens", "bytes", "words"):
        table.add_column(name, justify="right", no_wrap=True)

    def row(label: str, m: Any, **style: Any) -> None:
        table.add_row(label, _short(m.perplexity), f"{m.nll:.4f}", f"{m.bits_per_byte:.4f}",
                      _short(m.word_perplexity), str(m.tokens), str(m.bytes), str(m.words),
                      **style)

    for r in good:
        row(r.input.label, r.metrics)
    if len(good) > 1:
        row("total", scoring.total(good), style="bold", end_section=True)
    bos = "BOS prepended" if method.bos else "no BOS"
    table.caption = (f"window {method.max_length}, stride {method.stride}, {bos}, "
                     f"{method.dtype} on {method.device}. {scoring.NORMALISATION}.")
    table.caption_justify = "left"
    from nlgen.output import stdout_is_terminal

    # Off a terminal rich assumes 80 columns and would crop the numbers; a file gets them all.
    Console(width=None if stdout_is_terminal() else 160).print(table)


def _short(x: float) -> str:
    """A perplexity in a table cell: two decimals, or scientific when it is huge."""
    return f"{x:.2f}" if x < 1e6 else f"{x:.3e}"


class _Progress:
    """A progress bar on stderr (tokens scored / known so far), shown only for long inputs."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._task: Any = None

    def update(self, done: int, planned: int) -> None:
        if self._progress is None:
            if planned < PROGRESS_MIN_TOKENS:
                return
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            from nlgen.output import stderr_console

            self._progress = Progress(TextColumn("scoring tokens"), BarColumn(),
                                      MofNCompleteColumn(), TimeRemainingColumn(),
                                      console=stderr_console(), transient=True)
            self._task = self._progress.add_task("score", total=planned)
            self._progress.start()
        self._progress.update(self._task, completed=done, total=planned)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
