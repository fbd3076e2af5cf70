"""Sliding windows over texts, batched: what ``perplexity``, ``--reference`` and KL share.

The method is the Hugging Face guide's ("Perplexity of fixed-length models"): a window of
``max_length`` tokens slides by ``stride``, and each window predicts only the tokens no earlier
window predicted, so every token is predicted once, with the longest context the window allows.

:class:`WindowRunner` reads texts a group at a time, plans each text's windows, runs the
group's windows in batches (longest first, so a batch pads little), and adds up, per text, what
its subclass computes per window: one negative log-likelihood for :class:`scoring.Scorer`, four
sums for :class:`compare.Comparer`. Results come out in input order, group by group, so a
pipeline sees them while later input is still being read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nlgen.inputs import Text
from nlgen.loading import LoadedModel
from nlgen.streaming import read_ahead

READ_AHEAD_TEXTS = 8  # texts read ahead = batch_size * this, their windows sorted by length
READ_AHEAD_WINDOWS = 8  # ... or until this many batches of windows are pending

ProgressCallback = Callable[[int, int], None]  # (tokens done so far, tokens known to do)
Window = tuple[int, int, int]  # (begin, end, first predicted), absolute token indices


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The guide's windows over `n_tokens` tokens: (begin, end, first scored), absolute indices.

    Window ``[begin, end)`` scores tokens ``[first, end)``: those after the previous window's end
    (``trg_len`` in the guide), and never its own first token, which has no context in it.
    """
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:  # a disjoint window of one token predicts nothing
            windows.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def special_tokens_added(tokenizer: Any) -> tuple[bool, bool]:
    """(BOS prepended, EOS appended): what this tokenizer adds around a plain text."""
    probe = "a b"
    with_special = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for offset in range(len(with_special) - len(plain) + 1):
        if with_special[offset:offset + len(plain)] == plain:
            return offset > 0, offset + len(plain) < len(with_special)
    return False, False


@dataclass
class Pending:
    """A text in progress: its tokens, its windows, what they have added up to so far."""

    input: Text
    ids: list[int] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    sums: list[float] = field(default_factory=list)  # one per quantity the runner adds up
    error: str | None = None
    hint: str | None = None

    @property
    def predicted(self) -> int:
        return sum(end - first for _, end, first in self.windows)


@dataclass(frozen=True)
class WindowResult:
    """What a runner says of one input: its numbers (a subclass's `metrics`), or why not."""

    input: Text
    metrics: Any  # the subclass's sums and metrics; None when `error` is set
    input_tokens: int = 0  # tokens of the text as tokenized (BOS/EOS included)
    windows: int = 0
    error: str | None = None
    hint: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Batch:
    """A batch of windows as tensors: ids, mask, and which positions predict which tokens."""

    ids: Any  # (B, T) long, right-padded, on the device
    mask: Any | None  # (B, T), None when no window is padded
    where: tuple[Any, Any]  # (rows, cols) of the predicting positions, (N,) each
    targets: Any  # (N,) the tokens they predict
    counts: list[int]  # predicted tokens per window, to split (N,) back into windows


class WindowRunner:
    """Texts -> windows -> batches -> per-text sums. Subclasses compute a batch's sums."""

    verb = "score"  # in messages: "nothing to score"
    quantities = 1  # how many sums per window

    def __init__(self, lm: LoadedModel, opts: Any, *, context: int | None = None,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.lm = lm
        self.opts = opts  # scoring.ScoreOptions: max_length, stride, batch_size
        self.max_length, self.stride = opts.resolve(context or lm.context_length)
        self.bos, self.eos = special_tokens_added(lm.tokenizer)
        pad = lm.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else 0
        self.shard = shard  # (rank, ranks): run every ranks-th window of each group
        self.scored = 0  # tokens predicted so far, all texts
        self.planned = 0  # tokens to predict (this shard's) in the groups begun so far

    def run(self, texts: Iterable[Text],
            progress: ProgressCallback | None = None) -> Iterator[Pending]:
        """Every input, finished, in input order."""
        return self.run_prepared((self.prepare(item) for item in texts), progress)

    def run_prepared(self, prepared: Iterable[Pending],
                     progress: ProgressCallback | None = None) -> Iterator[Pending]:
        ahead_texts = self.opts.batch_size * READ_AHEAD_TEXTS
        ahead_windows = self.opts.batch_size * READ_AHEAD_WINDOWS

        def full(group: list[Pending]) -> bool:
            return (len(group) >= ahead_texts
                    or sum(len(p.windows) for p in group) >= ahead_windows)

        for group in read_ahead(prepared, full):
            yield from self._run_group(group, progress)

    def prepare(self, item: Text) -> Pending:
        pending = Pending(item)
        if item.error is not None:
            pending.error, pending.hint = item.error, item.hint
        elif not item.text.strip():
            pending.error = f"{item.label}: empty text, nothing to {self.verb}"
        else:
            pending.ids = list(self.lm.tokenizer(item.text)["input_ids"])
            self.plan(pending)
        return pending

    def plan(self, pending: Pending) -> Pending:
        """Windows for a tokenized text, or why it has none."""
        if len(pending.ids) < 2:
            pending.error = (f"{pending.input.label}: too short to {self.verb} "
                             f"({len(pending.ids)} token; at least 2 are needed)")
        else:
            pending.windows = plan_windows(len(pending.ids), self.max_length, self.stride)
            pending.sums = [0.0] * self.quantities
        return pending

    def _run_group(self, group: list[Pending],
                   progress: ProgressCallback | None) -> Iterator[Pending]:
        """Run every window of `group` in batches, longest first; yield the texts in order."""
        work = [(p, w) for p in group for w in p.windows]
        # Similar lengths share a batch, so little is spent on padding; the sort is stable, so
        # the batches (and their float rounding) are the same from run to run.
        work.sort(key=lambda pw: pw[1][1] - pw[1][0], reverse=True)
        work = work[self.shard[0]::self.shard[1]]  # with several ranks, a mix of every length
        self.planned += sum(w[1] - w[2] for _, w in work)
        size = self.opts.batch_size
        for start in range(0, len(work), size):
            chunk = work[start:start + size]
            for (p, _), sums in zip(chunk, self.batch_sums(self.pack(chunk)), strict=True):
                p.sums = [a + b for a, b in zip(p.sums, sums, strict=True)]
            self.scored += sum(w[1] - w[2] for _, w in chunk)
            if progress is not None:
                progress(self.scored, self.planned)
        yield from group

    def pack(self, chunk: list[tuple[Pending, Window]]) -> Batch:
        """The windows of `chunk` as one right-padded batch on the model's device."""
        import torch

        lengths = [end - begin for _, (begin, end, _) in chunk]
        width = max(lengths)
        ids = torch.full((len(chunk), width), self._pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
        rows: list[int] = []
        cols: list[int] = []
        counts = []
        for i, (pending, (begin, end, first)) in enumerate(chunk):
            ids[i, : end - begin] = torch.tensor(pending.ids[begin:end])
            mask[i, : end - begin] = 1
            # The logits at window position j predict token j + 1: the scored tokens
            # [first, end) are predicted from positions [first - 1, end - 1) - begin.
            positions = range(first - 1 - begin, end - 1 - begin)
            rows.extend([i] * len(positions))
            cols.extend(positions)
            counts.append(len(positions))
        row_index, col_index = torch.tensor(rows), torch.tensor(cols)
        device = self.lm.device
        targets = ids[row_index, col_index + 1].to(device)  # (N,)
        return Batch(ids.to(device), None if min(lengths) == width else mask.to(device),
                     (row_index.to(device), col_index.to(device)), targets, counts)

    def batch_sums(self, batch: Batch) -> list[list[float]]:
        """Per window of `batch`: the `quantities` sums over its predicted tokens."""
        raise NotImplementedError
