"""Sliding windows over texts, batched: what ``perplexity``, ``--reference`` and KL share.

The method is the Hugging Face guide's ("Perplexity of fixed-length models"): a window of
``max_length`` tokens slides by ``stride``, and each window predicts only the tokens no earlier
window predicted, so every token is predicted once, with the longest context the window allows.

:class:`WindowRunner` reads texts a group at a time, plans each text's windows, runs the
group's windows in batches (longest first, so a batch pads little), and adds up, per text, what
its subclass computes per window: one negative log-likelihood for :class:`scoring.Scorer`, four
sums for :class:`compare.Comparer`. Results come out in input order, group by group, so a
pipeline sees them while later input is still being read.

A long text is tokenized a piece at a time (:class:`Tokenize`): the tokenizer's working memory
for a whole text is some 200 bytes per character, its ids 4 bytes per token. What no window
predicts (the first token; with ``stride == max_length`` each window's first) is measured in
bytes and words (:meth:`nlgen.score.token_bytes.TokenSizes.share`), so that per-byte and per-word
figures divide by what was scored.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from nlgen.batching import read_ahead, sorted_batches
from nlgen.inputs import Text
from nlgen.models.loading import LoadedModel
from nlgen.score.kernel import Batch, pack_rows
from nlgen.score.token_bytes import TokenSizes

READ_AHEAD_TEXTS = 8  # texts read ahead = batch_size * this, their windows sorted by length
READ_AHEAD_WINDOWS = 8  # ... or until this many batches of windows are pending

ProgressCallback = Callable[[int, int], None]  # (tokens done so far, tokens known to do)
Window = tuple[int, int, int]  # (begin, end, first predicted), absolute token indices
PIECE_CHARS = 1 << 16  # a longer text is tokenized about this many characters at a time
# Where a text may be cut into pieces: before a space between two ASCII letters, after a line
# break between two non-space characters. Regex pre-tokenizers (GPT-2's, Llama 3's) start a new
# word there whatever comes before or after, so the pieces' tokens are the whole text's (a run
# of spaces or line breaks may be split otherwise: no cut in one). Tokenize checks that on a
# probe before it cuts.
_CUT = re.compile(r"(?<=[A-Za-z])(?= [A-Za-z])|(?<=\S)\n(?=\S)")
_PROBE = ("It was the best of times.\nIt was 1984 (or 2001)\n\u201cQuoted\u201d, "
          "caf\u00e9 na\u00efve\n\u65e5\u672c\u8a9e\t tabs  and   spaces\n"
          "'tis\n-- dashes --\n42\nLet's say it's done.\n\nEnd")


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


def unscored_ranges(windows: Sequence[Window], n_tokens: int) -> list[tuple[int, int]]:
    """The token ranges ``[a, b)`` that no window predicts (the windows as plan_windows gives)."""
    gaps = []
    at = 0
    for _, end, first in windows:
        if first > at:
            gaps.append((at, first))
        at = end
    if at < n_tokens:
        gaps.append((at, n_tokens))
    return gaps


def special_ids(tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """(ids before, ids after) what this tokenizer adds around a plain text; None if unclear."""
    probe = "a b"
    with_special = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for offset in range(len(with_special) - len(plain) + 1):
        if with_special[offset:offset + len(plain)] == plain:
            return with_special[:offset], with_special[offset + len(plain):]
    return None


def special_tokens_added(tokenizer: Any) -> tuple[bool, bool]:
    """(BOS prepended, EOS appended): what this tokenizer adds around a plain text."""
    found = special_ids(tokenizer)
    return (bool(found[0]), bool(found[1])) if found is not None else (False, False)


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of at least `size` characters, cut only where _CUT allows."""
    start = 0
    while True:
        cut = _CUT.search(text, start + size) if len(text) - start > size else None
        if cut is None:
            yield text[start:]
            return
        yield text[start:cut.end()]
        start = cut.end()


class Tokenize:
    """A text's token ids, with the tokenizer's special tokens; a long text a piece at a time.

    Pieces are used only when the tokenizer gives a probe text the same ids in pieces as whole
    (it splits words before merging them, and adds nothing at the start of each piece); else,
    and for a text with no place to cut, the whole text goes through the tokenizer at once.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.around = special_ids(tokenizer)
        self.in_pieces = self.around is not None and self._same_in_pieces()

    def _same_in_pieces(self) -> bool:
        if getattr(getattr(self.tokenizer, "backend_tokenizer", None), "pre_tokenizer",
                   None) is None:
            return False  # no word split first: a merge may cross a line break
        whole = self._plain(_PROBE)
        parts = [t for part in pieces(_PROBE, size=1) for t in self._plain(part)]
        return len(list(pieces(_PROBE, size=1))) > 5 and parts == whole

    def _plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, text: str) -> Sequence[int]:
        if not self.in_pieces or len(text) <= PIECE_CHARS:
            return array("i", self.tokenizer(text)["input_ids"])
        assert self.around is not None
        before, after = self.around
        ids = array("i", before)
        for part in pieces(text):
            ids.extend(self._plain(part))
        ids.extend(after)
        return ids


@dataclass
class Pending:
    """A text in progress: its tokens, its windows, what they have added up to so far."""

    input: Text
    ids: Sequence[int] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    sums: list[float] = field(default_factory=list)  # one per quantity the runner adds up
    unscored: tuple[int, int] = (0, 0)  # (UTF-8 bytes, words) of the tokens no window predicts
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
    unscored: tuple[int, int] = (0, 0)  # (UTF-8 bytes, words) of the text no window predicts

    @property
    def ok(self) -> bool:
        return self.error is None


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
        self.tokenize = Tokenize(lm.tokenizer)
        self.sizes = TokenSizes(lm.tokenizer)
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
            pending.ids = self.tokenize(item.text)
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
            if pending.input.text:
                gaps = unscored_ranges(pending.windows, len(pending.ids))
                pending.unscored = self.sizes.share(pending.input.text, pending.ids, gaps)
        return pending

    def _run_group(self, group: list[Pending],
                   progress: ProgressCallback | None) -> Iterator[Pending]:
        """Run every window of `group` in batches, longest first; yield the texts in order."""
        work = [(p, w) for p in group for w in p.windows]
        batches = sorted_batches(work, self.opts.batch_size, key=lambda pw: pw[1][1] - pw[1][0],
                                 reverse=True, shard=self.shard)
        self.planned += sum(w[1] - w[2] for batch in batches for _, w in batch)
        for batch in batches:
            packed = pack_rows([(p.ids[begin:end], first - 1 - begin, p.ids[first:end])
                                for p, (begin, end, first) in batch], self._pad_id, self.lm.device)
            for (p, _), sums in zip(batch, self.batch_sums(packed), strict=True):
                p.sums = [a + b for a, b in zip(p.sums, sums, strict=True)]
            self.scored += sum(w[1] - w[2] for _, w in batch)
            if progress is not None:
                progress(self.scored, self.planned)
        yield from group

    def batch_sums(self, batch: Batch) -> list[list[float]]:
        """Per window of `batch`: the `quantities` sums over its predicted tokens."""
        raise NotImplementedError
