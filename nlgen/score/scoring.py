"""Perplexity: sliding windows, batched negative log-likelihood, metrics.

The method is the one of the Hugging Face guide "Perplexity of fixed-length models": a window
of ``max_length`` tokens slides over the text by ``stride`` tokens, and each window scores only
the tokens that no earlier window scored, so every token is predicted once, with the longest
context the window allows. ``stride == max_length`` gives disjoint windows (the first token of
each window is then predicted by no one, as in the guide).

What we do differently from the guide's loop, and why (benchmarks/bench_perplexity.py measures
it):

- windows of one text, or of many short texts, are batched (right padding; causal attention
  means padding never reaches a real position, the mask is there for models that care);
- the transformer body runs once per window without a KV cache (nothing is decoded);
- the LM head runs only on the positions that are scored, a chunk at a time, and the
  log-softmax of each chunk is taken in float32 only for those rows (nlgen.score.kernel, the
  one kernel of every scoring command): the guide computes full-vocabulary logits for every
  position of every window and upcasts all of them to float32 inside the loss;
- negative log-likelihoods are summed in float64 and counted exactly: the guide counts
  ``trg_len - 1`` tokens for every window, but its overlapping windows score ``trg_len`` (only the
  first window loses a label to the shift), which weights windows slightly wrongly.

Core module: no typer, no rich, no printing. Notices go to the "nlgen" logger; the CLI's
progress bar is a callback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from nlgen.errors import UsageError
from nlgen.inputs import Text
from nlgen.models.loading import LoadedModel
from nlgen.score.kernel import Batch, head_vocab, hidden_rows, score_rows, split_model
from nlgen.score.windows import Pending, ProgressCallback, WindowResult, WindowRunner

DEFAULT_MAX_LENGTH_CAP = 1024  # the guide's window (GPT-2's context); longer costs memory
# How each number is derived from the sums, stated beside every result.
NORMALISATION = ("perplexity = exp(nll_sum / tokens_scored); nll = nll_sum / tokens_scored "
                 "(nats/token); bits_per_byte = nll_sum / (ln 2 * bytes_scored); "
                 "word_perplexity = exp(nll_sum / words_scored); bytes_scored: the UTF-8 bytes "
                 "of the scored tokens (the text's, less those of the tokens no window "
                 "predicts: the first, and each window's first when stride = max_length); "
                 "words_scored: the whitespace-separated words whose first character is in a "
                 "scored token")


@dataclass(frozen=True)
class ScoreOptions:
    """How to score; ``None`` means "derive from the model"."""

    max_length: int | None = None  # window, in tokens; None: the model's context, capped at 1024
    stride: int | None = None  # tokens the window moves; None: half the window
    batch_size: int = 8  # windows per forward pass

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise UsageError(f"--max-length must be at least 2 (got {self.max_length})",
                             hint="a window needs one token of context and one to predict")
        if self.stride is not None and self.stride < 1:
            raise UsageError(f"--stride must be positive (got {self.stride})")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if (self.stride is not None and self.max_length is not None
                and self.stride > self.max_length):
            raise UsageError(f"--stride {self.stride} is larger than --max-length "
                             f"{self.max_length}", hint=_STRIDE_HINT)

    def resolve(self, context: int) -> tuple[int, int]:
        """(window, stride) for a model whose context is `context` tokens."""
        if self.max_length is not None and self.max_length > context:
            raise UsageError(f"--max-length {self.max_length} is longer than the model's "
                             f"context ({context} tokens)", hint=f"use --max-length {context}")
        window = self.max_length or min(context, DEFAULT_MAX_LENGTH_CAP)
        stride = self.stride or max(1, window // 2)
        if stride > window:
            raise UsageError(f"--stride {stride} is larger than the window ({window} tokens)",
                             hint=_STRIDE_HINT)
        return window, stride


_STRIDE_HINT = "use a stride between 1 and --max-length (equal to it gives disjoint windows)"


@dataclass(frozen=True)
class Method:
    """How the numbers were obtained: enough to reproduce them."""

    max_length: int  # window, tokens
    stride: int
    bos: bool  # the tokenizer prepends a BOS token (then the first text token is scored too)
    eos: bool  # the tokenizer appends an EOS token (then it is scored like any other)
    dtype: str
    device: str

    def as_dict(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "stride": self.stride, "bos": self.bos,
                "eos": self.eos, "dtype": self.dtype, "device": self.device,
                "normalisation": NORMALISATION}


@dataclass(frozen=True)
class Metrics:
    """Sums over one or more texts, and the metrics derived from them."""

    nll_sum: float  # nats, summed over the scored tokens (float64)
    tokens: int  # tokens scored (predicted), not tokens read
    bytes: int  # UTF-8 bytes of the text(s)
    words: int  # whitespace-separated words of the text(s)
    unscored_bytes: int = 0  # bytes of the tokens that no window predicts
    unscored_words: int = 0  # words that begin in such a token

    @property
    def bytes_scored(self) -> int:
        """UTF-8 bytes of the scored tokens: what bits_per_byte divides by."""
        return max(self.bytes - self.unscored_bytes, 0)

    @property
    def words_scored(self) -> int:
        """Words that begin in a scored token: what word_perplexity divides by."""
        return max(self.words - self.unscored_words, 0)

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood, nats per token."""
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return safe_exp(self.nll)

    @property
    def bits_per_byte(self) -> float:
        scored = self.bytes_scored
        return self.nll_sum / (math.log(2) * scored) if scored else math.nan

    @property
    def word_perplexity(self) -> float:
        scored = self.words_scored
        return safe_exp(self.nll_sum / scored) if scored else math.nan


@dataclass(frozen=True)
class TextScore(WindowResult):
    """The result for one input: its metrics, or why it could not be scored."""

    metrics: Metrics | None  # None when `error` is set


def total(scores: Iterable[TextScore]) -> Metrics:
    """Corpus-level metrics: sums over the scored inputs (token-weighted, like one long text)."""
    good = [s.metrics for s in scores if s.metrics is not None]
    return Metrics(nll_sum=math.fsum(m.nll_sum for m in good), tokens=sum(m.tokens for m in good),
                   bytes=sum(m.bytes for m in good), words=sum(m.words for m in good),
                   unscored_bytes=sum(m.unscored_bytes for m in good),
                   unscored_words=sum(m.unscored_words for m in good))


def safe_exp(x: float) -> float:
    """exp(x), or inf where it overflows: a perplexity too large for a float."""
    try:
        return math.exp(x)
    except OverflowError:  # as run_clm.py: a perplexity too large for a float is inf
        return math.inf


# ----------------------------------------------------------------------------- scoring


class Scorer(WindowRunner):
    """A loaded model ready to score texts with fixed options.

    ``shard=(rank, ranks)`` scores every ranks-th window of each group (nlgen.jobs.parallel adds the
    ranks' sums up); a text's result is then this rank's share of it.
    """

    def __init__(self, lm: LoadedModel, opts: ScoreOptions,
                 shard: tuple[int, int] = (0, 1)) -> None:
        super().__init__(lm, opts, shard=shard)
        self.method = Method(self.max_length, self.stride, self.bos, self.eos, lm.dtype,
                             lm.device)
        self._body, self._head = split_model(lm.model)

    def score(self, texts: Iterable[Text],
              progress: ProgressCallback | None = None) -> Iterator[TextScore]:
        """A result per input, in input order (see :class:`nlgen.score.windows.WindowRunner`)."""
        for pending in self.run(texts, progress):
            yield _result(pending)

    def batch_sums(self, batch: Batch) -> list[list[float]]:
        """Summed NLL (nats, float64) of the scored tokens of each window of `batch`."""
        import torch

        with torch.inference_mode():
            rows = score_rows(self._head, hidden_rows(self._body, batch), batch.targets,
                              vocab=head_vocab(self.lm.model))
        nll = -rows.logprob  # (N,) float64
        return [[float(part.sum())] for part in torch.split(nll, batch.counts)]


def _result(pending: Pending) -> TextScore:
    if pending.error is not None:
        return TextScore(pending.input, None, len(pending.ids), error=pending.error,
                         hint=pending.hint)
    metrics = text_metrics(pending.input.text, pending.sums[0], pending.predicted,
                           pending.unscored)
    return TextScore(pending.input, metrics, len(pending.ids), windows=len(pending.windows),
                     unscored=pending.unscored)


def text_metrics(text: str, nll_sum: float, tokens: int, unscored: tuple[int, int]) -> Metrics:
    """A text's Metrics: its bytes and words, less the `unscored` (bytes, words)."""
    return Metrics(nll_sum=nll_sum, tokens=tokens, bytes=len(text.encode("utf-8")),
                   words=len(text.split()), unscored_bytes=unscored[0],
                   unscored_words=unscored[1])


def score_texts(lm: LoadedModel, texts: Iterable[Text], opts: ScoreOptions,
                progress: ProgressCallback | None = None) -> Iterator[TextScore]:
    """Score each input with `lm`; results in input order (see :class:`Scorer`)."""
    return Scorer(lm, opts).score(texts, progress)
