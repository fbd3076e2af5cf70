"""Record files -> checked examples -> one masked token sequence per example (no packing).

Conversations and prompt-completion pairs are not packed: each example is its own sequence,
cut at ``--block-size`` (the end goes), padded per batch, with labels ``-100`` on padding and
on what the loss does not cover, so that no example attends to another. Records are read and
checked before the model loads; they are tokenized once the tokenizer is there.

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nlgen.errors import InputError, UsageError
from nlgen.finetune.chat import (
    IGNORE,
    INPUT_FORMATS,
    RECORD_FORMATS,
    TEXT,
    BadRecord,
    Encoder,
    Example,
    check_record,
    detect_format,
)
from nlgen.finetune.data import PackedData
from nlgen.finetune.options import FinetuneOptions
from nlgen.inputs import Record, Source, iter_records, parse_record

log = logging.getLogger("nlgen")

SHOWN = 5  # bad records named one by one in a --skip-bad warning


def detect_formats(sources: list[Source], forced: str) -> list[str]:
    """Each source's format: ``forced`` unless "auto"; else a .jsonl file's by the keys of its
    first record (``messages``; ``prompt`` and ``completion``; anything else is text)."""
    if forced not in INPUT_FORMATS:
        raise UsageError(f"unknown --input-format {forced!r}",
                         hint="use one of: " + ", ".join(INPUT_FORMATS))
    if forced != "auto":
        return [forced] * len(sources)
    found = []
    for s in sources:
        first = next((r for r in _records(s) if r.fields is not None), None) \
            if s.kind == "jsonl" else None
        found.append(detect_format(first.fields) if first and first.fields else TEXT)
    return found


def _records(source: Source) -> Iterator[Record]:
    if source.text is not None:  # stdin, already read
        for number, line in enumerate(source.text.splitlines(), 1):
            if line.strip():
                yield parse_record(source.name, number, line)
        return
    yield from iter_records(str(source.path))


def family(sources: list[Source], formats: list[str], what: str = "training data") -> str:
    """TEXT, or the record formats found ("messages", "prompt-completion" or both, joined by
    "+"); plain text and records do not mix in one run."""
    kinds = sorted(set(formats))
    if TEXT in kinds and len(kinds) > 1:
        text = next(s.name for s, f in zip(sources, formats) if f == TEXT)
        other = next((s.name, f) for s, f in zip(sources, formats) if f != TEXT)
        raise InputError(f"the {what} mixes plain text ({text}) and {other[1]} records "
                         f"({other[0]})", hint="train on one kind at a time, or force one "
                         "with --input-format")
    return "+".join(kinds)


@dataclass
class Records:
    """The checked examples of the training and validation files, and the bad records."""

    train: list[tuple[str, Example]]
    validation: list[tuple[str, Example]]
    bad: list[str] = field(default_factory=list)  # "file:line: problem", in file order


def read_records(sources: list[Source], validation: list[Source], formats: list[str],
                 vformats: list[str], skip_bad: bool) -> Records:
    """Every record checked; a bad one stops the run unless ``skip_bad``."""
    records = Records(_examples(sources, formats), _examples(validation, vformats))
    records.bad = [where for where, ex in records.train + records.validation
                   if isinstance(ex, str)]
    records.train = [(w, ex) for w, ex in records.train if not isinstance(ex, str)]
    records.validation = [(w, ex) for w, ex in records.validation if not isinstance(ex, str)]
    _refuse_or_count(records.bad, skip_bad)
    if not records.train:
        raise InputError("no training record is left: every one is bad")
    if validation and not records.validation:
        raise InputError("no validation record is left: every one is bad")
    return records


def _examples(sources: list[Source], formats: list[str]) -> list[tuple[str, Any]]:
    """(where, Example) per record, or (the problem with its place, the problem)."""
    out: list[tuple[str, Any]] = []
    for s, fmt in zip(sources, formats):
        if fmt not in RECORD_FORMATS:
            continue
        for r in _records(s):
            if r.fields is None:
                out.append((r.error, r.error))
                continue
            try:
                out.append((r.label, check_record(r.fields, fmt)))
            except BadRecord as exc:
                out.append((f"{r.label}: {exc}", f"{r.label}: {exc}"))
    return out


def _refuse_or_count(bad: list[str], skip_bad: bool) -> None:
    if not bad:
        return
    if not skip_bad:
        more = f" (and {len(bad) - 1} more bad records)" if len(bad) > 1 else ""
        raise InputError(bad[0] + more, hint="fix the record, or pass --skip-bad to leave "
                         "bad records out")
    for where in bad[:SHOWN]:
        log.warning("skipped %s", where)
    if len(bad) > SHOWN:
        log.warning("skipped %d more bad records", len(bad) - SHOWN)


# ----------------------------------------------------------------------------- tokens


@dataclass
class Encoded:
    ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # cut, some trained tokens left
    dropped: list[str] = field(default_factory=list)  # cut, every trained token lost
    bad: list[str] = field(default_factory=list)  # the template could not mask them


def encode(examples: list[tuple[str, Example]], encoder: Encoder, max_len: int) -> Encoded:
    """Each example's tokens and labels, cut at ``max_len`` tokens."""
    out = Encoded()
    for where, ex in examples:
        try:
            ids, labels = encoder(ex)
        except BadRecord as exc:
            out.bad.append(f"{where}: {exc}")
            continue
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            if all(t == IGNORE for t in labels):
                out.dropped.append(where)
                continue
            out.truncated.append(where)
        out.ids.append(ids)
        out.labels.append(labels)
    return out


def _report_cuts(enc: Encoded, max_len: int, what: str) -> None:
    if enc.truncated:
        log.warning("%s longer than %d tokens, cut to fit (%s); raise --block-size to keep "
                    "the ends", _count(enc.truncated, what), max_len, _first(enc.truncated))
    if enc.dropped:
        log.warning("%s lost every trained token to the cut at %d tokens: left out (%s); raise "
                    "--block-size to train on them", _count(enc.dropped, what), max_len,
                    _first(enc.dropped))


def _count(places: list[str], what: str) -> str:
    return f"{len(places)} {what} example{'s' * (len(places) != 1)}"


def _first(places: list[str]) -> str:
    return ", ".join(places[:SHOWN]) + (", ..." if len(places) > SHOWN else "")


def prepare_examples(records: Records, opts: FinetuneOptions, tokenizer: Any, max_len: int,
                     end_of_turn: list[int], fmt: str) -> PackedData:
    """Tokenized, masked, cut and split examples, with the collator that pads them."""
    from datasets import Dataset

    if not getattr(tokenizer, "chat_template", None) and any(
            ex.prompt is None for _, ex in records.train + records.validation):
        raise InputError("the model's tokenizer has no chat template to render conversations "
                         "with", hint="use a chat model (e.g. --model builtin), or give "
                         "prompt-completion records whose prompt and completion are strings")
    encoder = Encoder(tokenizer, opts.train_on, end_of_turn)
    train = encode(records.train, encoder, max_len)
    val = encode(records.validation, encoder, max_len)
    bad = train.bad + val.bad
    _refuse_or_count(bad, opts.skip_bad)
    _report_cuts(train, max_len, "training")
    _report_cuts(val, max_len, "validation")
    if not train.ids:
        raise InputError(f"no training example is left to train on (of {len(records.train)})",
                         hint="raise --block-size, or fix the records")
    if records.validation and not val.ids:
        raise InputError("no validation example is left to measure on",
                         hint="raise --block-size, or fix the records")
    train_ds = Dataset.from_dict({"input_ids": train.ids, "labels": train.labels})
    val_ds = Dataset.from_dict({"input_ids": val.ids, "labels": val.labels}) if val.ids \
        else None
    if not records.validation and opts.split > 0:
        train_ds, val_ds = _split(train_ds, opts)
    facts = _facts(records, train, val, bad, train_ds, val_ds)
    return PackedData(train_ds, val_ds, max_len, facts["train"]["trained_tokens"]
                      + facts["train"]["masked_tokens"], fmt, facts,
                      PadCollator(_pad_id(tokenizer)))


def _split(ds: Any, opts: FinetuneOptions) -> tuple[Any, Any]:
    """Held-out examples (a share, at least one), chosen with the run's seed."""
    if len(ds) < 2:
        raise InputError(f"{len(ds)} example is too few to hold one out for validation",
                         hint="give more records, a --validation-file, or --validation-split 0")
    n_val = min(max(1, round(opts.split * len(ds))), len(ds) - 1)
    order = list(range(len(ds)))
    random.Random(opts.seed).shuffle(order)
    held = sorted(order[:n_val])
    kept = sorted(order[n_val:])
    return ds.select(kept), ds.select(held)


def _facts(records: Records, train: Encoded, val: Encoded, bad: list[str], train_ds: Any,
           val_ds: Any) -> dict[str, Any]:
    """For the run record: examples, trained and masked tokens, of each set."""

    def counts(ds: Any) -> dict[str, int]:
        if ds is None:
            return {"examples": 0, "trained_tokens": 0, "masked_tokens": 0}
        labels = ds["labels"]
        trained = sum(sum(t != IGNORE for t in lab) for lab in labels)
        tokens = sum(len(lab) for lab in labels)
        return {"examples": len(ds), "trained_tokens": trained,
                "masked_tokens": tokens - trained}

    return {
        "skipped_bad_records": len(records.bad) + len(bad),
        "truncated": len(train.truncated) + len(val.truncated),
        "dropped_by_truncation": len(train.dropped) + len(val.dropped),
        "train": counts(train_ds),
        "validation": counts(val_ds),
    }


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0  # any id: padding is masked from attention and loss alike


class PadCollator:
    """Right-pads a batch to its longest example: attention 0 and labels -100 on the padding."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        ids, mask, labels = [], [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_id] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
            labels.append(list(f["labels"]) + [IGNORE] * pad)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                "labels": torch.tensor(labels)}
