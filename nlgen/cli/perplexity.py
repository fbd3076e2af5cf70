"""``nlgen perplexity``: texts in, how likely the model finds them out."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import TimeRemainingColumn
from rich.table import Table

from nlgen import devices, inputs, loading, scoring
from nlgen.cli import comparison, console
from nlgen.cli.options import (
    BatchSizeOpt,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    ModelOpt,
    PerplexityFormat,
    QuietOpt,
    ReferenceOpt,
    TrustRemoteCodeOpt,
    VerboseOpt,
)
from nlgen.cli.runtime import guard
from nlgen.errors import EXIT_FAILURE, InputError, UsageError

IO = "Input and output"
WINDOW = "Window"
PROGRESS_MIN_TOKENS = 2048  # below this a bar would only flicker


@guard
def perplexity(
    ctx: typer.Context,
    files: Annotated[Optional[list[str]], typer.Argument(
        help="Text files ('-' is stdin). None: stdin when it is piped.", show_default=False)]
    = None,
    per_line: Annotated[bool, typer.Option(
        "--per-line", help="Score each line on its own (blank lines skipped), one record a line.",
        rich_help_panel=IO)] = False,
    fmt: Annotated[PerplexityFormat, typer.Option(
        "--format", help="auto: a table on a terminal, else jsonl; json: one object; jsonl: one "
        "object per input.", rich_help_panel=IO)] = PerplexityFormat.auto,
    max_length: Annotated[Optional[int], typer.Option(
        "--max-length", help="Window in tokens.", show_default="the model's context, at most "
        f"{scoring.DEFAULT_MAX_LENGTH_CAP}", rich_help_panel=WINDOW)] = None,
    stride: Annotated[Optional[int], typer.Option(
        "--stride", help="Tokens the window moves; equal to --max-length gives disjoint windows.",
        show_default="half the window", rich_help_panel=WINDOW)] = None,
    batch_size: BatchSizeOpt = 8,
    model: ModelOpt = None,
    reference: ReferenceOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    trust_remote_code: TrustRemoteCodeOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure how likely a model finds texts: perplexity, bits per byte, word perplexity.

    Examples:

      nlgen perplexity --model builtin essay.txt

      nlgen perplexity --max-length 512 --stride 256 --format json a.txt b.txt

      nlgen perplexity --model my-lora --reference base held-out.txt

    With --reference, each record also holds the reference's perplexity, perplexity_ratio
    (model / reference), kl (mean KL(reference || model) per token, nats) and top1_agreement
    (share of tokens where both models rank the same token first). Both models must share a
    tokenizer.

      nlgen generate -N 8 "The sea" --format jsonl | jq -r .text |
        nlgen perplexity --per-line --format jsonl | jq -s 'sort_by(.perplexity)'
    """
    devices.check_device_spec(device)
    opts = scoring.ScoreOptions(max_length=max_length, stride=stride, batch_size=batch_size)
    texts = _texts(files, per_line)
    if fmt is PerplexityFormat.auto:
        fmt = PerplexityFormat.table if console.stdout_is_terminal() else PerplexityFormat.jsonl

    models = comparison.load(model, reference, device=device, dtype=dtype.value,
                             trust_remote_code=trust_remote_code)
    lm, scorer = models.lm, comparison.perplexity_scorer(models, opts)
    results = []
    with _Progress() as bar:
        for result in scorer.score(texts, progress=bar.update if bar.enabled else None):
            # stdout carries scores only: an error record without a perplexity would sort first
            # in a `jq sort_by(.perplexity)` ranking. Failures go to stderr, and the exit code.
            if not result.ok:
                console.error(result.error or "", result.hint)
            elif fmt is PerplexityFormat.jsonl:
                console.write_jsonl(_record(result, lm.name, scorer.method, per_line))
            results.append(result)
    _finish(results, fmt, lm, scorer, per_line, verbose)


def _texts(files: list[str] | None, per_line: bool) -> Iterator[inputs.Text]:
    """The texts to score; an input with none is refused before any model loads.

    When no file given exists, fail now (only existence is checked of the others: reading
    here would drain a FIFO such as ``<(producer)``).
    """
    if not files:
        if inputs.stdin_is_terminal():
            raise UsageError("no input given",
                             hint="nlgen perplexity FILE ..., or pipe a text on stdin")
        files = [inputs.STDIN]
    existing = [f for f in files if f == inputs.STDIN or Path(f).exists()]
    if not existing:
        inputs.check_file(files[0])  # raises the message a missing file deserves
    texts = inputs.iter_texts(files, per_line=per_line)
    first = next(texts, None)
    if first is None:
        raise InputError("no text to score: the input has only blank lines")
    if len(files) == 1 and first.error is None and not first.text.strip():
        raise InputError(f"no text to score: {first.name} is empty")
    return chain([first], texts)


def _finish(results: list[scoring.TextScore], fmt: PerplexityFormat, lm: loading.LoadedModel,
            scorer: Any, per_line: bool, verbose: bool) -> None:
    """The document or table that needs every result, the summary, and the exit code."""
    good = [r for r in results if r.ok]
    if fmt is PerplexityFormat.json:
        console.write(json.dumps(_document(results, lm.name, scorer.method, per_line),
                                 ensure_ascii=False, indent=2) + "\n")
    elif fmt is PerplexityFormat.table and good:
        _print_table(results, lm.name, scorer.method)
    if verbose or console.stderr_is_terminal():
        console.summary(lm.name, lm.device, lm.dtype,
                        f"{console.plural(scorer.scored, 'token')} scored in {len(good)} of "
                        f"{console.plural(len(results), 'input')}")
    if len(good) < len(results):
        if len(results) > 1:
            what = "line" if per_line else "input"
            console.error(f"{len(results) - len(good)} of "
                          f"{console.plural(len(results), what)} could not be scored "
                          "(see above)")
        raise typer.Exit(EXIT_FAILURE)


# ----------------------------------------------------------------------------- rendering


def _num(x: float) -> float | None:
    """JSON has no inf or nan: an overflowed perplexity is written as null."""
    return x if math.isfinite(x) else None


def _metrics(m: scoring.Metrics) -> dict[str, Any]:
    return {"perplexity": _num(m.perplexity), "nll": _num(m.nll),
            "bits_per_byte": _num(m.bits_per_byte), "word_perplexity": _num(m.word_perplexity),
            "tokens": m.tokens, "bytes": m.bytes, "words": m.words, "nll_sum": m.nll_sum}


def _record(result: scoring.TextScore, model: str, method: scoring.Method,
            per_line: bool) -> dict[str, Any]:
    """One input's record: its numbers, and the method beside them."""
    assert result.metrics is not None  # only scored results are rendered
    record: dict[str, Any] = {"input": result.input.name}
    if per_line:
        record["line"] = result.input.line
        record["text"] = result.input.text
    record.update(_metrics(result.metrics))
    record.update(comparison.fields(result))
    record["model"] = model
    record["method"] = {**method.as_dict(), "tokens_scored": result.metrics.tokens,
                        "input_tokens": result.input_tokens, "windows": result.windows}
    return record


def _document(results: list[scoring.TextScore], model: str, method: scoring.Method,
              per_line: bool) -> dict[str, Any]:
    """--format json: the inputs scored, those that failed and why, the total of the first."""
    good = [r for r in results if r.ok]
    summed = scoring.total(good)
    failed = [{"input": r.input.name, **({"line": r.input.line} if per_line else {}),
               "error": r.error} for r in results if not r.ok]
    return {
        "model": model,
        "inputs": [_record(r, model, method, per_line) for r in good],
        "failed": failed,
        "total": {**_metrics(summed), **comparison.total_fields(good), "inputs": len(good),
                  "failed": len(results) - len(good),
                  "model": model,
                  "method": {**method.as_dict(), "tokens_scored": summed.tokens}},
    }


def _print_table(results: list[scoring.TextScore], model: str, method: scoring.Method) -> None:
    good = [r for r in results if r.ok]
    table = Table(title=f"Perplexity: {model}", title_justify="left")
    widest = max(len(r.input.label) for r in good)
    table.add_column("input", overflow="fold", min_width=min(widest, 32))
    for name in ("ppl", "nll/token", "bits/byte", "word ppl", "tokens", "bytes", "words",
                 *comparison.headers(good)):
        table.add_column(name, justify="right", no_wrap=True)

    def row(label: str, m: scoring.Metrics, compared: dict[str, Any], **style: Any) -> None:
        table.add_row(label, _short(m.perplexity), f"{m.nll:.4f}", f"{m.bits_per_byte:.4f}",
                      _short(m.word_perplexity), str(m.tokens), str(m.bytes), str(m.words),
                      *comparison.cells(compared), **style)

    for r in good:
        assert r.metrics is not None
        row(r.input.label, r.metrics, comparison.fields(r))
    if len(good) > 1:
        row("total", scoring.total(good), comparison.total_fields(good), style="bold",
            end_section=True)
    bos = "BOS prepended" if method.bos else "no BOS"
    table.caption = (f"window {method.max_length}, stride {method.stride}, {bos}, "
                     f"{method.dtype} on {method.device}. {scoring.NORMALISATION}.")
    table.caption_justify = "left"
    console.stdout_console().print(table)


def _short(x: float) -> str:
    """A perplexity in a table cell: two decimals, or scientific when it is huge."""
    return f"{x:.2f}" if x < 1e6 else f"{x:.3e}"


class _Progress(console.ProgressBar):
    """Tokens scored / known so far, shown only on a terminal and only for long inputs."""

    def __init__(self) -> None:
        super().__init__("scoring tokens", TimeRemainingColumn())
        self.enabled = console.progress_enabled()

    def update(self, done: int, total: int, **fields: Any) -> None:
        if self._progress is None and total < PROGRESS_MIN_TOKENS:
            return
        super().update(done, total, **fields)
