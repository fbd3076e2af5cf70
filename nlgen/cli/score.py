"""``nlgen score``: how likely is a completion given a prompt; which choice does a model prefer."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nlgen import inputs
from nlgen.cli import comparison, console, jobs, score_render
from nlgen.cli.options import ScoreFormat, ScoringJob, scoring_job
from nlgen.cli.runtime import guard
from nlgen.errors import EXIT_FAILURE, InputError, UsageError
from nlgen.jobs import distributed, parallel
from nlgen.score import likelihood, records

IO = "Input and output"
FIELDS = "Record fields"


@guard
@scoring_job
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
    *, job: ScoringJob,
) -> None:
    """Score completions: log-likelihood given a prompt, and multiple-choice predictions.

    Records, one JSON object a line: {"prompt", "completion"} gets logprob (the completion's
    token log-probs summed, nats), num_tokens, num_bytes, is_greedy (every token the model's
    first choice) and truncated (the prompt lost tokens on its left). {"prompt", "choices",
    "label"?} gets logprobs (one a choice; the other keys become lists), pred (highest
    logprob), pred_norm (highest per character), pred_bytes (highest per UTF-8 byte) and, with
    a label, acc, acc_norm and acc_bytes (1 or 0), as lm-eval defines them. The input's fields
    come back too, after index (the record's place in the input, from 0). Tokenisation as
    lm-eval's loglikelihood. With --reference: reference_logprob(s), the reference model's
    (with its own tokenizer).

    acc, acc_norm and acc_bytes over the file (with standard errors) close the run on stderr,
    or sit in the document's "summary" with --format json. A bad record (one with both a
    completion and choices among them) is one Error line naming its file and line; the others
    are still scored, and the exit code is 1.

    Examples:

      nlgen score pairs.jsonl --model builtin

      echo '{"prompt": "2 + 2 =", "choices": [" 4", " 5"], "label": 0}' | nlgen score

      nlgen score --text lines.txt --tokens --top 3 | jq .tokens

      torchrun --nproc_per_node 2 -m nlgen score mmlu.jsonl --output scores.jsonl
    """
    opts = likelihood.LikelihoodOptions(batch_size=job.batch_size, max_length=max_length,
                                        want_tokens=tokens, top_k=top)
    fields = records.Fields(prompt_field, completion_field, choices_field, label_field)
    if fmt is ScoreFormat.auto:
        fmt = ScoreFormat.table if console.stdout_is_terminal() else ScoreFormat.jsonl
    with jobs.scoring(job, files) as rank_device:
        items = parallel.on_every_rank(lambda: _items(files, text, fields))
        # --output: the records go to the file, stdout stays empty
        run = _Run(ScoreFormat.jsonl if job.output else fmt)

        def scorer_for(shard: tuple[int, int]) -> records.RecordScorer:
            run.models = models = comparison.load(job, rank_device)
            run.scorer = records.RecordScorer(models.lm, opts, reference=models.reference,
                                              reference_ctx=models.reference_ctx, shard=shard)
            return run.scorer

        # what defines the job for --resume (the batch size changes no record)
        identity = jobs.identity("score", job, files, text=text, tokens=tokens, top=top,
                                 max_length=max_length,
                                 **{f"{k}_field": v for k, v in dataclasses.asdict(fields).items()})
        started = time.perf_counter()
        with parallel.JobOutput(job.output, KEY_FIELDS, job.resume, identity) as out, \
                jobs.JobProgress("scoring records", None, done=out.resumed) as bar:
            run.writer = out.writer
            for result in parallel.Gathered(parallel.score_records(scorer_for, items, out.done)):
                run.show(result)
                assert run.scorer is not None
                bar.total = run.scorer.read  # records read so far (all ranks', resumed ones)
                bar.advance(1, sum(s.num_tokens for s in result.scores))
    if distributed.is_main_process() and run.models is not None:
        _finish(run, time.perf_counter() - started, job, out.resumed)


KEY_FIELDS = ("index",)  # what names a record of --output: its place in the input


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
    return (dataclasses.replace(item, index=index)
            for index, item in enumerate(chain([first], items)))


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


@dataclass
class _Run:
    """Rank 0's side: each record's result to --output or stdout, as it comes."""

    fmt: ScoreFormat
    models: comparison.Models | None = None  # this rank's model (and reference), once loaded
    scorer: records.RecordScorer | None = None
    writer: Any = None  # the --output file's ResumableWriter
    results: list[records.RecordScore] = field(default_factory=list)  # kept without --output
    count: int = 0  # records done in this run, scored or failed
    failed: int = 0
    truncated: int = 0  # records whose prompt lost tokens on its left

    def show(self, result: records.RecordScore) -> None:
        # stdout and the file carry scores only; failures go to stderr, and the exit code
        assert self.scorer is not None
        self.count += 1
        if not result.ok:
            self.failed += 1
            console.error(result.error or "", result.hint)
        else:
            self.truncated += any(s.truncated for s in result.scores)
            record = score_render.record(result, self.scorer.scorer.want_tokens)
            if self.writer is not None:
                self.writer.write(record)
                return  # the file holds it: the closing lines read the file
            if self.fmt is ScoreFormat.jsonl:
                console.write_jsonl(record)
        self.results.append(result)


def _finish(run: _Run, seconds: float, job: ScoringJob, resumed: int) -> None:
    """What needs every result (a table, the json document, the summary), and the exit code."""
    assert run.models is not None and run.scorer is not None
    lm = run.models.lm
    if job.output is not None:  # every record of the file, this run's and earlier ones
        summary = score_render.file_summary(job.output, run.failed)
        earlier = f", {resumed} from the resumed run" if resumed else ""
        accuracy = f"; {score_render.accuracy_line(summary)}" if summary.labelled else ""
        console.notice(f"{job.output}: {console.plural(summary.records, 'record')}{earlier}"
                       f"{accuracy}")
    else:
        summary = records.summarize(run.results)
    good = [r for r in run.results if r.ok]
    if run.fmt is ScoreFormat.json:
        doc = score_render.document(run.results, summary, lm.name, run.models.reference_name,
                                    run.scorer.scorer.want_tokens)
        console.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
    elif job.output is None:
        if run.fmt is ScoreFormat.table and good:
            score_render.table(good, lm.name, run.models.reference_name)
        if summary.labelled:
            console.notice(score_render.accuracy_line(summary))
    if run.truncated:
        console.notice(f"{console.plural(run.truncated, 'record')} had the prompt cut on its "
                       f"left to fit the model's {run.scorer.scorer.max_length}-token window")
    if job.verbose or console.stderr_is_terminal():
        console.summary(lm.name, lm.device, lm.dtype,
                        f"{run.count - run.failed} of {console.plural(run.count, 'record')} "
                        f"scored in {seconds:.1f} s{jobs.processes()}")
    if run.failed:
        if run.count > 1:
            console.error(f"{run.failed} of {console.plural(run.count, 'record')} could not be "
                          "scored (see above)")
        raise typer.Exit(EXIT_FAILURE)
