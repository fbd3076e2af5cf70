"""Training data: checked inputs -> one text dataset -> EOS-joined tokens -> packed blocks.

Packing follows run_clm.py's ``group_texts``: documents are concatenated (each followed by EOS,
so packed documents stay told apart) and cut into ``block_size`` chunks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nlgen.errors import InputError, first_line
from nlgen.finetune.options import FinetuneOptions
from nlgen.inputs import Source

log = logging.getLogger("nlgen")


@dataclass
class PackedData:
    """What the Trainer gets: packed blocks of text, or one sequence per record (examples)."""

    train: Any  # datasets.Dataset of {"input_ids", "labels"} blocks (or examples)
    validation: Any | None
    block_size: int  # may be smaller than asked for, when the text is short
    train_tokens: int  # tokens in the training text (before dropping remainders)
    format: str = "text"  # or the record formats: "messages", "prompt-completion", joined by +
    facts: dict[str, Any] | None = None  # records: examples, trained and masked tokens
    collator: Any = None  # records: pads each batch (None: the blocks need no padding)


def load_texts(sources: list[Source], opts: FinetuneOptions) -> Any:
    """The inputs as one datasets.Dataset with a single "text" column (one row a document)."""
    from datasets import Dataset, concatenate_datasets, load_dataset

    sample_by = "line" if opts.line_by_line else "document"
    parts = []
    texts = [s for s in sources if s.kind == "text" and s.path is not None]
    if texts:
        parts.append(load_dataset("text", data_files=[str(s.path) for s in texts], split="train",
                                  sample_by=sample_by, keep_linebreaks=not opts.line_by_line))
    for kind in ("json", "csv"):
        files = [str(s.path) for s in sources if s.kind == ("jsonl" if kind == "json" else kind)]
        if files:
            ds = load_dataset(kind, data_files=files, split="train")
            ds = ds.select_columns([opts.text_field])
            if opts.text_field != "text":
                ds = ds.rename_column(opts.text_field, "text")
            parts.append(ds)
    for s in sources:
        if s.text is not None:
            rows = s.text.splitlines() if opts.line_by_line else [s.text]
            parts.append(Dataset.from_dict({"text": rows}))
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(
        [p.cast(parts[0].features) for p in parts])
    # Blank lines (line by line) and empty records carry nothing to learn.
    return ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)


def _load(sources: list[Source], opts: FinetuneOptions) -> Any:
    from datasets.exceptions import DatasetGenerationError

    try:
        return load_texts(sources, opts)
    except DatasetGenerationError as exc:
        # A record pyarrow cannot fit in one table: a .jsonl field whose type changes between
        # records, or a .csv row with more fields than the header.
        raise InputError(f"cannot load the data: {first_line(exc.__cause__ or exc)}",
                         hint="every record of a .jsonl file needs the same fields with the "
                         "same types; every row of a .csv file as many fields as its header"
                         ) from None


def tokenize(ds: Any, tokenizer: Any, num_proc: int | None) -> Any:
    """Each document's tokens followed by EOS, so that packed documents stay told apart."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the model's tokenizer has no EOS token to join documents with")

    def encode(batch: dict[str, list[str]]) -> dict[str, list]:
        ids = tokenizer(batch["text"])["input_ids"]
        ids = [x + [eos] for x in ids]
        return {"input_ids": ids, "length": [len(x) for x in ids]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                  desc="tokenizing")


def pack(ds: Any, block_size: int, num_proc: int | None, in_one_batch: bool = False) -> Any:
    """run_clm's group_texts: concatenate, cut into block_size chunks, drop the remainder.

    ``in_one_batch`` groups everything at once (small corpora), so that no block is lost to
    the remainder that each batch of 1000 documents drops.
    """

    def group(batch: dict[str, list]) -> dict[str, list]:
        joined = [t for ids in batch["input_ids"] for t in ids]
        total = len(joined) // block_size * block_size
        blocks = [joined[i:i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    return ds.map(group, batched=True, batch_size=None if in_one_batch else 1000,
                  remove_columns=ds.column_names, num_proc=None if in_one_batch else num_proc,
                  desc=f"packing into blocks of {block_size}")


def prepare_data(sources: list[Source], validation: list[Source], opts: FinetuneOptions,
                 tokenizer: Any, block_size: int,
                 main_process_first: Callable[[], Any]) -> PackedData:
    """Tokenize and pack the training text, and split off (or pack) the validation blocks."""
    size = sum(s.size for s in sources)
    # Worker processes cost ~1 s each to start; worth it only on a large corpus.
    num_proc = min(os.cpu_count() or 1, 8) if size > 64 << 20 else None
    with main_process_first():
        tokens = tokenize(_load(sources, opts), tokenizer, num_proc)
        total = sum(tokens["length"])
        need = 2 if opts.split > 0 else 1  # one training block, plus one for validation
        in_one_batch = False
        if total < need * block_size:
            block_size = _shrunk_block(total, need, block_size)
            in_one_batch = True
        packed = pack(tokens, block_size, num_proc, in_one_batch)
        if len(packed) < need:  # per-batch remainders ate the blocks: regroup in one batch
            packed = pack(tokens, block_size, num_proc, in_one_batch=True)
        val_ds = None
        if opts.split > 0:
            n_val = min(max(1, round(opts.split * len(packed))), len(packed) - 1)
            parts = packed.train_test_split(test_size=n_val, seed=opts.seed, shuffle=True)
            packed, val_ds = parts["train"], parts["test"]
        elif validation:
            val_ds = _validation_blocks(validation, opts, tokenizer, block_size, num_proc)
    return PackedData(packed, val_ds, block_size, total)


def _shrunk_block(total: int, need: int, block_size: int) -> int:
    """A block size that lets a short text fill the blocks it needs, with a warning."""
    shrunk = total // need
    if shrunk < 2:
        raise InputError(f"the training text is too short: {total} tokens", hint="give more text")
    log.warning("the training text holds only %d tokens, less than %s of %d; training on blocks "
                "of %d tokens instead", total,
                "two blocks (train + validation)" if need == 2 else "one block", block_size, shrunk)
    return shrunk


def _validation_blocks(validation: list[Source], opts: FinetuneOptions, tokenizer: Any,
                       block_size: int, num_proc: int | None) -> Any:
    vtokens = tokenize(_load(validation, opts), tokenizer, num_proc)
    vtotal = sum(vtokens["length"])
    if vtotal < block_size:
        log.warning("the validation text holds only %d tokens, less than one block of %d; "
                    "evaluating it as one block of %d", vtotal, block_size, vtotal)
        return pack(vtokens, vtotal, None, in_one_batch=True)
    return pack(vtokens, block_size, num_proc)
