"""Scoring records: a completion given a prompt, or which of several choices a model prefers.

Records come from the input layer (nlgen.inputs: one JSON object a line, or plain text lines)
and are scored by nlgen.score.likelihood, which tokenizes exactly as lm-eval's ``loglikelihood``:

- ``{"prompt": p, "completion": c}``: log p(c | p), summed over c's tokens (nats);
- ``{"prompt": p, "choices": [c0, c1, ...], "label": k}``: log p(ci | p) for each choice;
  ``pred`` is the choice with the highest log-likelihood, ``pred_norm`` the highest per
  character of the choice, ``pred_bytes`` the highest per UTF-8 byte, and with a label,
  ``acc``, ``acc_norm`` and ``acc_bytes`` say whether they are right: lm-eval's three metrics
  of a multiple-choice task (``len(choice)`` and ``len(choice.encode("utf-8"))``);
- a record with both a completion and choices is refused: one of them would be ignored;
- a plain text line: a completion of an empty prompt (the tokenizer's BOS, else EOS, stands for
  it, as in lm-eval).

A reference model, when given, scores the same requests: with its own tokenizer (a
log-likelihood of a string means the same whatever the tokenizer), or, for a LoRA adapter, as
the same model with its adapter switched off (``reference_ctx``).

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from nlgen.batching import read_ahead
from nlgen.inputs import Record
from nlgen.models.adapters import ReferenceContext
from nlgen.models.loading import LoadedModel
from nlgen.score.likelihood import (
    READ_AHEAD_BATCHES,
    ContinuationScore,
    ContinuationScorer,
    LikelihoodOptions,
    Request,
)

ProgressCallback = Callable[[int, int], None]  # (records scored so far, records read so far)


@dataclass(frozen=True)
class Fields:
    """Which fields of a record hold what (``--prompt-field`` and the others)."""

    prompt: str = "prompt"
    completion: str = "completion"
    choices: str = "choices"
    label: str = "label"


@dataclass(frozen=True)
class Item:
    """A record made ready to score: its requests (one, or one per choice), or why not."""

    name: str  # a path or "<stdin>"
    line: int
    fields: dict[str, Any]  # the record as read ({"text": line} for a plain text line)
    requests: tuple[Request, ...] = ()
    multiple_choice: bool = False
    label: int | None = None  # the right choice, when the record says
    error: str | None = None
    hint: str | None = None
    index: int = 0  # its place among the input's records, from 0 (the key of --output)

    @property
    def where(self) -> str:
        return f"{self.name}:{self.line}"


def from_text(name: str, line: int, text: str) -> Item:
    """A plain text line: the completion of an empty prompt."""
    return Item(name, line, {"text": text}, (Request("", text),))


def from_record(record: Record, fields: Fields) -> Item:
    """Check a record's fields and turn it into requests; a bad record becomes an Item with an
    error that names its file and line."""
    if record.fields is None:
        return Item(record.name, record.line, {}, error=record.error, hint=record.hint)
    row = record.fields

    def bad(message: str, hint: str | None = None) -> Item:
        return Item(record.name, record.line, row, error=f"{record.label}: {message}", hint=hint)

    prompt = row.get(fields.prompt)
    if fields.prompt not in row or not isinstance(prompt, str):
        return bad(_missing(row, fields.prompt, "a string"),
                   hint="name the prompt's field with --prompt-field")
    if fields.choices in row and fields.completion in row \
            and fields.choices != fields.completion:
        return bad(f"both {fields.completion!r} and {fields.choices!r} fields: a record is a "
                   "completion or a multiple choice, not both",
                   hint="drop one of the two fields, or name the right ones with "
                   "--completion-field and --choices-field")
    if fields.choices in row:
        choices = row[fields.choices]
        if not isinstance(choices, list) or not choices:
            return bad(f"{fields.choices!r} must be a non-empty list of strings (got "
                       f"{_kind(choices)})")
        for i, choice in enumerate(choices):
            if not isinstance(choice, str) or choice == "":
                return bad(f"choice {i} is {'empty' if choice == '' else _kind(choice)}: every "
                           "choice must be a non-empty string")
        label = row.get(fields.label)
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)
                                  or not 0 <= label < len(choices)):
            return bad(f"{fields.label!r} must be the index of a choice, 0 to {len(choices) - 1} "
                       f"(got {json_repr(label)})")
        return Item(record.name, record.line, row, tuple(Request(prompt, c) for c in choices),
                    multiple_choice=True, label=label)
    if fields.completion not in row:
        return bad(f"no {fields.completion!r} or {fields.choices!r} field (it has: "
                   f"{', '.join(row) or 'none'})",
                   hint="name the fields with --completion-field or --choices-field")
    completion = row[fields.completion]
    if not isinstance(completion, str):
        return bad(f"{fields.completion!r} must be a string (got {_kind(completion)})")
    if completion == "":
        return bad(f"{fields.completion!r} is empty: nothing to score")
    return Item(record.name, record.line, row, (Request(prompt, completion),))


def _missing(row: dict[str, Any], field: str, want: str) -> str:
    if field in row:
        return f"{field!r} must be {want} (got {_kind(row[field])})"
    return f"no '{field}' field (it has: {', '.join(row) or 'none'})"


def _kind(value: Any) -> str:
    return {list: "a list", dict: "an object", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), "null")


def json_repr(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RecordScore:
    """What a record scored: one ContinuationScore per request (per choice), or an error."""

    item: Item
    scores: tuple[ContinuationScore, ...] = ()
    reference: tuple[ContinuationScore, ...] = ()  # the reference's, when there is one
    error: str | None = None
    hint: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def pred(self) -> int:
        """The choice with the highest log-likelihood (the first of equals, as numpy's argmax)."""
        return _argmax([s.logprob for s in self.scores])

    @property
    def pred_norm(self) -> int:
        """The choice with the highest log-likelihood per character (lm-eval's acc_norm)."""
        return _argmax([s.logprob / s.num_chars for s in self.scores])

    @property
    def pred_bytes(self) -> int:
        """The choice with the highest log-likelihood per UTF-8 byte (lm-eval's acc_bytes)."""
        return _argmax([s.logprob / s.num_bytes for s in self.scores])

    @property
    def acc(self) -> int | None:
        return self._right(self.pred)

    @property
    def acc_norm(self) -> int | None:
        return self._right(self.pred_norm)

    @property
    def acc_bytes(self) -> int | None:
        return self._right(self.pred_bytes)

    def _right(self, pred: int) -> int | None:
        return None if self.item.label is None else int(pred == self.item.label)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


@dataclass(frozen=True)
class Summary:
    """The whole input: records scored and failed, and accuracy over the labelled ones."""

    records: int
    failed: int
    labelled: int  # multiple-choice records with a label
    correct: int
    correct_norm: int  # right per character
    correct_bytes: int = 0  # right per UTF-8 byte

    @property
    def acc(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def acc_norm(self) -> float | None:
        return self.correct_norm / self.labelled if self.labelled else None

    @property
    def acc_bytes(self) -> float | None:
        return self.correct_bytes / self.labelled if self.labelled else None

    @property
    def acc_stderr(self) -> float | None:
        """Standard error of acc, as lm-eval reports it: sqrt(p (1 - p) / (n - 1))."""
        return _stderr(self.acc, self.labelled)

    @property
    def acc_norm_stderr(self) -> float | None:
        return _stderr(self.acc_norm, self.labelled)

    @property
    def acc_bytes_stderr(self) -> float | None:
        return _stderr(self.acc_bytes, self.labelled)


def _stderr(p: float | None, n: int) -> float | None:
    return None if p is None or n < 2 else math.sqrt(p * (1 - p) / (n - 1))


def summarize(results: Iterable[RecordScore]) -> Summary:
    results = list(results)
    labelled = [r for r in results if r.ok and r.item.label is not None]
    return Summary(records=sum(r.ok for r in results), failed=sum(not r.ok for r in results),
                   labelled=len(labelled), correct=sum(r.acc or 0 for r in labelled),
                   correct_norm=sum(r.acc_norm or 0 for r in labelled),
                   correct_bytes=sum(r.acc_bytes or 0 for r in labelled))


# ----------------------------------------------------------------------------- scoring


class RecordScorer:
    """A model (and perhaps a reference) ready to score records with fixed options.

    ``shard=(rank, ranks)`` scores every ranks-th read-ahead group of records and skips the
    others (nlgen.jobs.parallel gathers the ranks' results): every rank forms the same groups,
    so each record is scored in the batch one process would put it in, with the same rounding.
    """

    def __init__(self, lm: LoadedModel, opts: LikelihoodOptions, *,
                 reference: LoadedModel | None = None,
                 reference_ctx: ReferenceContext | None = None,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.opts = opts
        self.shard = shard
        self.scorer = ContinuationScorer(lm, opts)
        self._ctx: ReferenceContext = reference_ctx or contextlib.nullcontext
        self.reference: ContinuationScorer | None = None
        if reference is not None or reference_ctx is not None:
            ref_opts = LikelihoodOptions(batch_size=opts.batch_size, max_length=opts.max_length)
            with self._ctx():
                self.reference = ContinuationScorer(reference or lm, ref_opts)
        self.scored = 0  # records scored (or failed) so far, by this shard
        self.read = 0  # records read so far, all shards'

    def score(self, items: Iterable[Item], progress: ProgressCallback | None = None, *,
              done: Container[int] = frozenset()) -> Iterator[RecordScore]:
        """A result per record (of this shard), in input order, a read-ahead group of requests
        at a time.

        ``done``: the indices of records already scored (a resumed job's), which get no result.
        The groups are formed from every record all the same, so that each record left is
        scored in the batch of the job's first run; a group with nothing left to score is
        skipped, one with something is scored whole.
        """
        ahead = self.opts.batch_size * READ_AHEAD_BATCHES
        full = lambda group: sum(len(item.requests) for item in group) >= ahead  # noqa: E731
        me, ranks = self.shard
        for number, group in enumerate(read_ahead(items, full)):
            self.read += len(group)
            if number % ranks != me:
                continue
            left = [item for item in group if item.index not in done]
            if len(left) == len(group):
                yield from self._run_group(group, progress)
            elif any(item.error is None for item in left):
                yield from (r for r in self._run_group(group, progress)
                            if r.item.index not in done)
            else:  # only bad records left (never written): no forward pass for them
                self.scored += len(left)
                yield from (RecordScore(item, error=item.error, hint=item.hint)
                            for item in left)

    def _run_group(self, group: list[Item],
                   progress: ProgressCallback | None) -> Iterator[RecordScore]:
        requests = [r for item in group if item.error is None for r in item.requests]
        scores = iter(list(self.scorer.score(requests)))
        reference: Iterator[ContinuationScore] = iter(())
        if self.reference is not None:
            with self._ctx():  # every reference forward runs with the adapter switched off
                reference = iter(list(self.reference.score(requests)))
        for item in group:
            yield self._result(item, reference_on=self.reference is not None, scores=scores,
                               reference=reference)
        self.scored += len(group)
        if progress is not None and group:
            progress(self.scored, self.read)

    @staticmethod
    def _result(item: Item, *, reference_on: bool, scores: Iterator[ContinuationScore],
                reference: Iterator[ContinuationScore]) -> RecordScore:
        if item.error is not None:
            return RecordScore(item, error=item.error, hint=item.hint)
        n = len(item.requests)
        mine = tuple(next(scores) for _ in range(n))
        theirs = tuple(next(reference) for _ in range(n)) if reference_on else ()
        for i, (score, by) in enumerate([(s, "") for s in mine]
                                        + [(s, "reference model: ") for s in theirs]):
            if not score.ok:
                which = f"choice {i % n}: " if item.multiple_choice else ""
                return RecordScore(item, error=f"{item.where}: {by}{which}{score.error}",
                                   hint=score.hint)
        return RecordScore(item, mine, theirs)


def score_records(lm: LoadedModel, items: Iterable[Item], opts: LikelihoodOptions, *,
                  reference: LoadedModel | None = None,
                  reference_ctx: ReferenceContext | None = None,
                  progress: ProgressCallback | None = None) -> Iterator[RecordScore]:
    """Score every record with `lm` (and the reference); results in input order."""
    scorer = RecordScorer(lm, opts, reference=reference, reference_ctx=reference_ctx)
    return scorer.score(items, progress)
