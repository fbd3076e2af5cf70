"""``nlgen score``'s output: a record per input record, the json document, the table, the summary.

Kept apart from cli/score.py so that the command module reads as what the command does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from nlgen.cli import console
from nlgen.engine import token_logprobs
from nlgen.errors import InputError
from nlgen.jsonl import json_float
from nlgen.score import records

ELIDE = 40  # characters of a prompt or completion shown in a table cell


def record(result: records.RecordScore, want_tokens: bool) -> dict[str, Any]:
    """``index`` (the record's place in the input: the key of --output), the input record's
    fields, then what was measured (these keys win over the input's; a log-prob of -inf is
    null)."""
    out = {"index": result.item.index, **result.item.fields}
    out["index"] = result.item.index
    scores, ref = result.scores, result.reference
    if not result.item.multiple_choice:
        [one] = scores
        out.update(logprob=json_float(one.logprob), num_tokens=one.num_tokens,
                   num_bytes=one.num_bytes, is_greedy=one.is_greedy, truncated=one.truncated)
        if ref:
            out["reference_logprob"] = json_float(ref[0].logprob)
        if want_tokens:
            out["tokens"] = token_logprobs.openai_content(one.tokens)
        return out
    out.update(logprobs=[json_float(s.logprob) for s in scores],
               num_tokens=[s.num_tokens for s in scores], num_bytes=[s.num_bytes for s in scores],
               num_chars=[s.num_chars for s in scores],
               is_greedy=[s.is_greedy for s in scores], truncated=[s.truncated for s in scores],
               pred=result.pred, pred_norm=result.pred_norm, pred_bytes=result.pred_bytes)
    if result.item.label is not None:
        out.update(acc=result.acc, acc_norm=result.acc_norm, acc_bytes=result.acc_bytes)
    if ref:
        out["reference_logprobs"] = [json_float(s.logprob) for s in ref]
    if want_tokens:
        out["tokens"] = [token_logprobs.openai_content(s.tokens) for s in scores]
    return out


def summary_fields(summary: records.Summary) -> dict[str, Any]:
    return {"records": summary.records, "failed": summary.failed, "labelled": summary.labelled,
            "acc": summary.acc, "acc_stderr": summary.acc_stderr, "acc_norm": summary.acc_norm,
            "acc_norm_stderr": summary.acc_norm_stderr, "acc_bytes": summary.acc_bytes,
            "acc_bytes_stderr": summary.acc_bytes_stderr}


def file_summary(path: str, failed: int) -> records.Summary:
    """The summary of every record in an --output file (earlier runs' included), and of the
    ``failed`` records of this run (a failed record is not written)."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not JSON lines"
        raise InputError(f"cannot read {path} back: {reason}") from None
    labelled = [r for r in rows if all(r.get(k) in (0, 1) for k in ACC_KEYS)]
    correct, norm, by_bytes = ([r[k] for r in labelled] for k in ACC_KEYS)
    return records.Summary(records=len(rows), failed=failed, labelled=len(labelled),
                           correct=sum(correct), correct_norm=sum(norm),
                           correct_bytes=sum(by_bytes))


ACC_KEYS = ("acc", "acc_norm", "acc_bytes")  # a labelled multiple-choice record's


def document(results: Sequence[records.RecordScore], summary: records.Summary, model: str,
             reference: str | None, want_tokens: bool) -> dict[str, Any]:
    """--format json: every record scored, those that failed and why, the summary."""
    doc: dict[str, Any] = {"model": model}
    if reference is not None:
        doc["reference_model"] = reference
    doc["records"] = [record(r, want_tokens) for r in results if r.ok]
    doc["failed"] = [{"index": r.item.index, "input": r.item.name, "line": r.item.line,
                      "error": r.error} for r in results if not r.ok]
    doc["summary"] = summary_fields(summary)
    return doc


def accuracy_line(summary: records.Summary) -> str:
    """The closing line of a multiple-choice run (stderr)."""
    assert summary.acc is not None and summary.acc_norm is not None
    assert summary.acc_bytes is not None
    return (f"acc {summary.acc:.4f}{_pm(summary.acc_stderr)}, acc_norm "
            f"{summary.acc_norm:.4f}{_pm(summary.acc_norm_stderr)} (per character), acc_bytes "
            f"{summary.acc_bytes:.4f}{_pm(summary.acc_bytes_stderr)} (per byte) over "
            f"{console.plural(summary.labelled, 'labelled record')}")


def _pm(stderr: float | None) -> str:
    return "" if stderr is None else f" \u00b1 {stderr:.4f}"


def table(results: Sequence[records.RecordScore], model: str, reference: str | None) -> None:
    """One row a completion; a multiple-choice record has a row per choice, marked."""
    title = f"Scores: {model}" + (f" (reference: {reference})" if reference else "")
    grid = Table(title=title, title_justify="left")
    choices = any(r.item.multiple_choice for r in results)
    grid.add_column("record", no_wrap=True)
    grid.add_column("prompt", overflow="fold", ratio=1)
    grid.add_column("completion", overflow="fold", ratio=1)
    for name in ("logprob", *(["ref logprob"] if reference else []), "tokens", "bytes",
                 "greedy"):
        grid.add_column(name, justify="right", no_wrap=True)
    if choices:
        grid.add_column("", no_wrap=True)  # pred / pred_norm / label marks
    for r in results:
        rows = len(r.scores)
        for i, (request, s) in enumerate(zip(r.item.requests, r.scores, strict=True)):
            cells = [r.item.where if i == 0 else "", _elide(request.context) if i == 0 else "",
                     _elide(request.continuation), f"{s.logprob:.3f}"]
            if reference:
                cells.append(f"{r.reference[i].logprob:.3f}")
            cells += [str(s.num_tokens), str(s.num_bytes), "yes" if s.is_greedy else "no"]
            if choices:
                cells.append(_marks(r, i) if r.item.multiple_choice else "")
            grid.add_row(*cells, end_section=r.item.multiple_choice and i == rows - 1)
    console.stdout_console().print(grid)


def _marks(r: records.RecordScore, i: int) -> str:
    marks = [name for name, index in (("pred", r.pred), ("pred_norm", r.pred_norm),
                                      ("pred_bytes", r.pred_bytes), ("label", r.item.label))
             if index == i]
    return ", ".join(marks)


def _elide(text: str) -> str:
    shown = text.replace("\n", "\u21b5")
    return shown if len(shown) <= ELIDE else shown[:ELIDE - 1] + "\u2026"
