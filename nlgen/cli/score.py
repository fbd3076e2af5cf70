"""``nlgen score``: how likely is a completion given a prompt; which choice does a model prefer."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Annotated, Optional

import typer

from nlgen import inputs
from nlgen.cli import comparison, console, score_render
from nlgen.cli.options import (
    BatchSizeOpt,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    ModelOpt,
    QuietOpt,
    ReferenceOpt,
    ScoreFormat,
    TrustRemoteCodeOpt,
    VerboseOpt,
)
from nlgen.cli.runtime import guard
from nlgen.errors import EXIT_FAILURE, InputError, UsageError
from nlgen.models import loading
from nlgen.score import likelihood, records

IO = "Input and output"
FIELDS = "Record fields"


@guard
def score(
    ctx: typer.Context,
    files: Annotated[Optional[list[str]], typer.Argument(
        help="Input files ('-' is stdin): .jsonl records; .txt/.text/.md/.rst files hold plain "
        "text. None: stdin when it is piped.", show_default=False)] = None,
    text: Annotated[bool, typer.Option(
        "--text", help="Every input is plain text: each non-blank line is a completion of an "
        "empty prompt.", rich_help_panel=IO)] = False,
    fmt: Annotated[ScoreFormat, typer.Option(
        "--format", help="auto: a table on a terminal, else jsonl; jsonl: one object per "
        "record; json: one document with the summary.", rich_help_panel=IO)] = ScoreFormat.auto,
    tokens: Annotated[bool, typer.Option(
        "--tokens", help="Add each completion token with its log-prob: tokens = [{token, "
        "logprob, bytes, top_logprobs}].", rich_help_panel=IO)] = False,
    top: Annotated[int, typer.Option(
        "--top", min=0, help="With each token, its K most likely alternatives (implies "
        "--tokens).", show_default=True, rich_help_panel=IO)] = 0,
    prompt_field: Annotated[str, typer.Option(
        "--prompt-field", help="The field holding the prompt.", rich_help_panel=FIELDS)]
    = "prompt",
    completion_field: Annotated[str, typer.Option(
        "--completion-field", help="The field holding the completion.",
        rich_help_panel=FIELDS)] = "completion",
    choices_field: Annotated[str, typer.Option(
        "--choices-field", help="The field holding a list of choices (multiple choice).",
        rich_help_panel=FIELDS)] = "choices",
    label_field: Annotated[str, typer.Option(
        "--label-field", help="The field holding the index of the right choice (optional).",
        rich_help_panel=FIELDS)] = "label",
    max_length: Annotated[Optional[int], typer.Option(
        "--max-length", help="Tokens the model reads at most; a longer prompt loses tokens on "
        "its left.", show_default="the model's context")] = None,
    batch_size: BatchSizeOpt = 8,
    model: ModelOpt = None,
    reference: ReferenceOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    trust_remote_code: TrustRemoteCodeOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score completions: log-likelihood given a prompt, and multiple-choice predictions.

    Records, one JSON object a line: {"prompt", "completion"} gets logprob (the completion's
    token log-probs summed, nats), num_tokens, num_bytes, is_greedy (every token the model's
    first choice) and truncated (the prompt lost tokens on its left). {"prompt", "choices",
    "label"?} gets logprobs (one a choice; the other keys become lists), pred (highest
    logprob), pred_norm (highest per character), pred_bytes (highest per UTF-8 byte) and, with
    a label, acc, acc_norm and acc_bytes (1 or 0), as lm-eval defines them. The input's fields
    come back too. Tokenisation as lm-eval's loglikelihood. With --reference:
    reference_logprob(s), the reference model's (with its own tokenizer).

    acc, acc_norm and acc_bytes over the file (with standard errors) close the run on stderr,
    or sit in the document's "summary" with --format json. A bad record (one with both a
    completion and choices among them) is one Error line naming its file and line; the others
    are still scored, and the exit code is 1.

    Examples:

      nlgen score pairs.jsonl --model builtin

      echo '{"prompt": "2 + 2 =", "choices": [" 4", " 5"], "label": 0}' | nlgen score

      nlgen score --text lines.txt --tokens --top 3 | jq .tokens
    """
    loading.check_device_spec(device)
    opts = likelihood.LikelihoodOptions(batch_size=batch_size, max_length=max_length,
                                        want_tokens=tokens, top_k=top)
    fields = records.Fields(prompt_field, completion_field, choices_field, label_field)
    items = _items(files, text, fields)
    if fmt is ScoreFormat.auto:
        fmt = ScoreFormat.table if console.stdout_is_terminal() else ScoreFormat.jsonl

    models = comparison.load(model, reference, device=device, dtype=dtype.value,
                             trust_remote_code=trust_remote_code)
    scorer = records.RecordScorer(models.lm, opts, reference=models.reference,
                                  reference_ctx=models.reference_ctx)
    started = time.perf_counter()
    results = _score(scorer, items, fmt)
    _finish(results, fmt, models, scorer, time.perf_counter() - started, verbose)


def _score(scorer: records.RecordScorer, items: Iterator[records.Item],
           fmt: ScoreFormat) -> list[records.RecordScore]:
    """Every result; jsonl records written as they come, errors on stderr as they come."""
    results = []
    with console.ProgressBar("scoring records") as bar:
        progress = bar.update if console.progress_enabled() else None
        for result in scorer.score(items, progress=progress):
            if not result.ok:
                console.error(result.error or "", result.hint)
            elif fmt is ScoreFormat.jsonl:
                console.write_jsonl(score_render.record(result, scorer.scorer.want_tokens))
            results.append(result)
    return results


def _items(files: list[str] | None, text: bool,
           fields: records.Fields) -> Iterator[records.Item]:
    """The records to score; an input with none is refused before any model loads."""
    if not files:
        if inputs.stdin_is_terminal():
            raise UsageError("no input given",
                             hint="nlgen score FILE.jsonl ..., or pipe records on stdin")
        files = [inputs.STDIN]
    if not any(f == inputs.STDIN or Path(f).exists() for f in files):
        inputs.check_file(files[0])  # raises the message a missing file deserves
    items = chain.from_iterable(_read(name, text, fields) for name in files)
    first = next(items, None)
    if first is None:
        raise InputError("no records to score: the input is empty or has only blank lines")
    return chain([first], items)


def _read(name: str, text: bool, fields: records.Fields) -> Iterator[records.Item]:
    """One input's items, lazily; a file that cannot be read is one failed item."""
    if text or Path(name).suffix.lower() in inputs.TEXT_SUFFIXES:
        for line in inputs.iter_texts([name], per_line=True):
            if line.error is not None:
                yield records.Item(line.name, line.line or 0, {}, error=line.error,
                                   hint=line.hint)
            else:
                yield records.from_text(line.name, line.line or 0, line.text)
        return
    try:
        for record in inputs.iter_records(name):
            yield records.from_record(record, fields)
    except InputError as exc:
        yield records.Item(inputs.display_name(name), 0, {}, error=exc.message, hint=exc.hint)


def _finish(results: list[records.RecordScore], fmt: ScoreFormat, models: comparison.Models,
            scorer: records.RecordScorer, seconds: float, verbose: bool) -> None:
    """What needs every result (a table, the json document, the summary), and the exit code."""
    lm = models.lm
    summary = records.summarize(results)
    good = [r for r in results if r.ok]
    if fmt is ScoreFormat.json:
        doc = score_render.document(results, summary, lm.name, models.reference_name,
                                    scorer.scorer.want_tokens)
        console.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
    else:
        if fmt is ScoreFormat.table and good:
            score_render.table(good, lm.name, models.reference_name)
        if summary.labelled:
            console.notice(score_render.accuracy_line(summary))
    truncated = sum(any(s.truncated for s in r.scores) for r in good)
    if truncated:
        console.notice(f"{console.plural(truncated, 'record')} had the prompt cut on its left "
                       f"to fit the model's {scorer.scorer.max_length}-token window")
    if verbose or console.stderr_is_terminal():
        console.summary(lm.name, lm.device, lm.dtype,
                        f"{len(good)} of {console.plural(len(results), 'record')} scored in "
                        f"{seconds:.1f} s")
    if summary.failed:
        if len(results) > 1:
            console.error(f"{summary.failed} of {console.plural(len(results), 'record')} could "
                          "not be scored (see above)")
        raise typer.Exit(EXIT_FAILURE)
