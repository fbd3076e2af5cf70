"""``nlgen perplexity``: texts in, how likely the model finds them out."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import TimeRemainingColumn
from rich.table import Table

from nlgen import inputs
from nlgen.cli import comparison, console, jobs
from nlgen.cli.options import PerplexityFormat, ScoringJob, scoring_job
from nlgen.cli.runtime import guard
from nlgen.errors import EXIT_FAILURE, InputError, UsageError
from nlgen.jobs import distributed, parallel
from nlgen.jsonl import json_float
from nlgen.models import loading
from nlgen.score import scoring

IO = "Input and output"
WINDOW = "Window"
PROGRESS_MIN_TOKENS = 2048  # below this a bar would only flicker


@guard
@scoring_job
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
    *, job: ScoringJob,
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

      torchrun --nproc_per_node 2 -m nlgen perplexity --per-line corpus.txt --output ppl.jsonl
    """
    opts = scoring.ScoreOptions(max_length=max_length, stride=stride, batch_size=job.batch_size)
    if fmt is PerplexityFormat.auto:
        fmt = PerplexityFormat.table if console.stdout_is_terminal() else PerplexityFormat.jsonl
    with jobs.scoring(job, files) as rank_device:
        texts = parallel.on_every_rank(lambda: _texts(files, per_line, job.output))
        # --output: the records go to the file, stdout stays empty
        run = _Run(per_line, PerplexityFormat.jsonl if job.output else fmt)

        def scorer_for(shard: tuple[int, int]) -> Any:
            run.models = comparison.load(job, rank_device)
            scorer = comparison.perplexity_scorer(run.models, opts, shard)
            run.method = scorer.method
            return scorer

        # what defines the job for --resume (the batch size changes no record)
        identity = jobs.identity("perplexity", job, files, per_line=per_line,
                                 max_length=max_length, stride=stride)
        with parallel.JobOutput(job.output, KEY_FIELDS[per_line], job.resume,
                                identity) as out, _Progress() as bar:
            run.writer = out.writer
            texts = (t for t in texts if _key(t, per_line) not in out.done)
            parts = parallel.score_parts(scorer_for, texts, bar.update if bar.enabled else None)
            for result in parallel.merge_parts(parallel.Gathered(parts)):
                run.show(result)
    if distributed.is_main_process() and run.models is not None:
        if job.output is not None:
            run.total_of(job.output, out.resumed)
        _finish(run.results, run.fmt, run.models.lm, run.method, per_line, job.verbose)


KEY_FIELDS = {False: ("input",), True: ("input", "line")}  # what names a record of --output


def _key(text: inputs.Text, per_line: bool) -> Any:
    """A text's key in the --output file, as ResumableWriter reads it back."""
    return (text.name, text.line) if per_line else text.name


def _texts(files: list[str] | None, per_line: bool,
           output: str | None = None) -> Iterator[inputs.Text]:
    """The texts to score; an input with none is refused before any model loads.

    When no file given exists, fail now (only existence is checked of the others: reading
    here would drain a FIFO such as ``<(producer)``).
    """
    if not files:
        if inputs.stdin_is_terminal():
            raise UsageError("no input given",
                             hint="nlgen perplexity FILE ..., or pipe a text on stdin")
        files = [inputs.STDIN]
    if output is not None and not per_line and len(set(files)) < len(files):
        raise UsageError("an input is named twice: --output keeps one record per input")
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


@dataclass
class _Run:
    """Rank 0's side: each text's result to --output or stdout, as it comes."""

    per_line: bool
    fmt: PerplexityFormat
    models: comparison.Models | None = None  # this rank's model (and reference), once loaded
    method: scoring.Method | None = None
    writer: Any = None  # the --output file's ResumableWriter
    results: list[scoring.TextScore] = field(default_factory=list)

    def show(self, result: scoring.TextScore) -> None:
        # stdout carries scores only: an error record without a perplexity would sort first
        # in a `jq sort_by(.perplexity)` ranking. Failures go to stderr, and the exit code.
        assert self.method is not None and self.models is not None
        name = self.models.lm.name
        if not result.ok:
            console.error(result.error or "", result.hint)
        elif self.writer is not None:
            self.writer.write(_record(result, name, self.method, self.per_line))
            # The file holds the record: keep only what the closing lines count.
            result = dataclasses.replace(result, input=dataclasses.replace(result.input, text=""))
        elif self.fmt is PerplexityFormat.jsonl:
            console.write_jsonl(_record(result, name, self.method, self.per_line))
        self.results.append(result)

    def total_of(self, output: str, resumed: int) -> None:
        """--output: the corpus total of every record in the file, this run's and earlier."""
        with open(output, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        # A record written before bytes_scored existed counted the text's bytes (and words).
        summed = scoring.Metrics(
            nll_sum=math.fsum(r["nll_sum"] for r in rows), tokens=sum(r["tokens"] for r in rows),
            bytes=sum(r["bytes"] for r in rows), words=sum(r["words"] for r in rows),
            unscored_bytes=sum(r["bytes"] - r.get("bytes_scored", r["bytes"]) for r in rows),
            unscored_words=sum(r["words"] - r.get("words_scored", r["words"]) for r in rows))
        earlier = f", {resumed} from the resumed run" if resumed else ""
        console.notice(f"{output}: {console.plural(len(rows), 'record')}{earlier}; perplexity "
                       f"{_short(summed.perplexity)}, {summed.bits_per_byte:.4f} bits/byte over "
                       f"{console.plural(summed.tokens, 'token')}")


def _finish(results: list[scoring.TextScore], fmt: PerplexityFormat, lm: loading.LoadedModel,
            method: scoring.Method | None, per_line: bool, verbose: bool) -> None:
    """The document or table that needs every result, the summary, and the exit code."""
    good = [r for r in results if r.ok]
    if fmt is PerplexityFormat.json and method is not None:
        console.write(json.dumps(_document(results, lm.name, method, per_line),
                                 ensure_ascii=False, indent=2) + "\n")
    elif fmt is PerplexityFormat.table and good and method is not None:
        _print_table(results, lm.name, method)
    if verbose or console.stderr_is_terminal():
        console.summary(lm.name, lm.device, lm.dtype,
                        f"{console.plural(scoring.total(good).tokens, 'token')} scored in "
                        f"{len(good)} of {console.plural(len(results), 'input')}"
                        f"{jobs.processes()}")
    if len(good) < len(results):
        if len(results) > 1:
            what = "line" if per_line else "input"
            console.error(f"{len(results) - len(good)} of "
                          f"{console.plural(len(results), what)} could not be scored "
                          "(see above)")
        raise typer.Exit(EXIT_FAILURE)


# ----------------------------------------------------------------------------- rendering


def _metrics(m: scoring.Metrics) -> dict[str, Any]:
    # JSON has no inf or nan: an overflowed perplexity is written as null.
    return {"perplexity": json_float(m.perplexity), "nll": json_float(m.nll),
            "bits_per_byte": json_float(m.bits_per_byte),
            "word_perplexity": json_float(m.word_perplexity),
            "tokens": m.tokens, "bytes": m.bytes, "words": m.words,
            "bytes_scored": m.bytes_scored, "words_scored": m.words_scored, "nll_sum": m.nll_sum}


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
    for name in ("ppl", "nll/token", "bits/byte", "word ppl", "tokens", "bytes\nscored",
                 "words\nscored", *comparison.headers(good)):
        table.add_column(name, justify="right", no_wrap=True)

    def row(label: str, m: scoring.Metrics, compared: dict[str, Any], **style: Any) -> None:
        table.add_row(label, _short(m.perplexity), f"{m.nll:.4f}", f"{m.bits_per_byte:.4f}",
                      _short(m.word_perplexity), str(m.tokens), str(m.bytes_scored),
                      str(m.words_scored),
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
        # Under a launcher: rank 0's share of the windows, which stands for the whole.
        self.enabled = console.progress_enabled() and distributed.is_main_process()

    def update(self, done: int, total: int, **fields: Any) -> None:
        if self._progress is None and total < PROGRESS_MIN_TOKENS:
            return
        super().update(done, total, **fields)
