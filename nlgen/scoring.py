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
  log-softmax of each chunk is taken in float32 only for those rows: the guide computes
  full-vocabulary logits for every position of every window and upcasts all of them to float32
  inside the loss;
- negative log-likelihoods are summed in float64 and counted exactly: the guide counts
  ``trg_len - 1`` tokens for every window, but its overlapping windows score ``trg_len`` (only the
  first window loses a label to the shift), which weights windows slightly wrongly.

Core module: no typer, no rich, no printing. Notices go to the "nlgen" logger; the CLI's
progress bar is a callback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nlgen.errors import UsageError
from nlgen.inputs import Text
from nlgen.loading import LoadedModel

log = logging.getLogger("nlgen")

DEFAULT_MAX_LENGTH_CAP = 1024  # the guide's window (GPT-2's context); longer costs memory
CHUNK_ELEMENTS = 1 << 23  # logits per chunk of the LM head (8 M: 32 MB in float32)
READ_AHEAD_TEXTS = 8  # texts read ahead = batch_size * this, their windows sorted by length
READ_AHEAD_WINDOWS = 8  # ... or until this many batches of windows are pending
# How each number is derived from the sums, stated beside every result.
NORMALISATION = ("perplexity = exp(nll_sum / tokens_scored); nll = nll_sum / tokens_scored "
                 "(nats/token); bits_per_byte = nll_sum / (ln 2 * UTF-8 bytes); "
                 "word_perplexity = exp(nll_sum / words), words split on whitespace")

ProgressCallback = Callable[[int, int], None]  # (tokens scored so far, tokens known to score)


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
    words: int  # whitespace-separated words

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood, nats per token."""
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return safe_exp(self.nll)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / (math.log(2) * self.bytes) if self.bytes else math.nan

    @property
    def word_perplexity(self) -> float:
        return safe_exp(self.nll_sum / self.words) if self.words else math.nan


@dataclass(frozen=True)
class TextScore:
    """The result for one input: its metrics, or why it could not be scored."""

    input: Text
    metrics: Metrics | None  # None when `error` is set
    input_tokens: int = 0  # tokens of the text as tokenized (BOS/EOS included)
    windows: int = 0
    error: str | None = None
    hint: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def total(scores: Iterable[TextScore]) -> Metrics:
    """Corpus-level metrics: sums over the scored inputs (token-weighted, like one long text)."""
    good = [s.metrics for s in scores if s.metrics is not None]
    return Metrics(nll_sum=math.fsum(m.nll_sum for m in good), tokens=sum(m.tokens for m in good),
                   bytes=sum(m.bytes for m in good), words=sum(m.words for m in good))


def safe_exp(x: float) -> float:
    """exp(x), or inf where it overflows: a perplexity too large for a float."""
    try:
        return math.exp(x)
    except OverflowError:  # as run_clm.py: a perplexity too large for a float is inf
        return math.inf


# ----------------------------------------------------------------------------- windows


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
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


# ----------------------------------------------------------------------------- scoring


@dataclass
class _Pending:
    """A text being scored: its tokens, its windows, what they have added up to so far."""

    input: Text
    ids: list[int] = field(default_factory=list)
    windows: list[tuple[int, int, int]] = field(default_factory=list)
    nll_sum: float = 0.0
    error: str | None = None
    hint: str | None = None

    def result(self) -> TextScore:
        if self.error is not None:
            return TextScore(self.input, None, len(self.ids), error=self.error, hint=self.hint)
        text = self.input.text
        metrics = Metrics(nll_sum=self.nll_sum, tokens=sum(e - f for _, e, f in self.windows),
                          bytes=len(text.encode("utf-8")), words=len(text.split()))
        return TextScore(self.input, metrics, len(self.ids), windows=len(self.windows))


class Scorer:
    """A loaded model ready to score texts with fixed options."""

    def __init__(self, lm: LoadedModel, opts: ScoreOptions, shard: tuple[int, int] = (0, 1),
                 ) -> None:
        self.lm = lm
        self.shard = shard  # (rank, ranks): score every ranks-th window (nlgen.parallel)
        self.opts = opts
        self.max_length, self.stride = opts.resolve(lm.context_length)
        bos, eos = special_tokens_added(lm.tokenizer)
        self.method = Method(self.max_length, self.stride, bos, eos, lm.dtype, lm.device)
        self._body, self._head = split_model(lm.model)
        pad = lm.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else 0
        self.scored = 0  # tokens scored so far, all texts
        self.planned = 0  # tokens to score (this shard's) in the groups begun so far

    def score(self, texts: Iterable[Text],
              progress: ProgressCallback | None = None) -> Iterator[TextScore]:
        """A result per input, in input order.

        Inputs are read a group at a time (``batch_size * 8`` texts, or as many windows): the
        group's windows are batched together, then its results come out, so a pipeline sees
        them while later input is still being read.
        """
        ahead_texts = self.opts.batch_size * READ_AHEAD_TEXTS
        ahead_windows = self.opts.batch_size * READ_AHEAD_WINDOWS
        group: list[_Pending] = []
        n_windows = 0
        for item in texts:
            pending = self._prepare(item)
            group.append(pending)
            n_windows += len(pending.windows)
            if len(group) >= ahead_texts or n_windows >= ahead_windows:
                yield from self._run_group(group, progress)
                group, n_windows = [], 0
        yield from self._run_group(group, progress)

    def _prepare(self, item: Text) -> _Pending:
        pending = _Pending(item)
        if item.error is not None:
            pending.error, pending.hint = item.error, item.hint
            return pending
        if not item.text.strip():
            pending.error = f"{item.label}: empty text, nothing to score"
            return pending
        pending.ids = list(self.lm.tokenizer(item.text)["input_ids"])
        if len(pending.ids) < 2:
            pending.error = (f"{item.label}: too short to score ({len(pending.ids)} token; "
                             "a perplexity needs at least 2)")
            return pending
        pending.windows = plan_windows(len(pending.ids), self.max_length, self.stride)
        return pending

    def _run_group(self, group: list[_Pending],
                   progress: ProgressCallback | None) -> Iterator[TextScore]:
        """Run every window of `group` in batches, longest first; yield results in order."""
        work = [(p, w) for p in group for w in p.windows]
        # Similar lengths share a batch, so little is spent on padding; the sort is stable, so
        # the batches (and their float rounding) are the same from run to run.
        work.sort(key=lambda pw: pw[1][1] - pw[1][0], reverse=True)
        work = work[self.shard[0]::self.shard[1]]  # with several ranks, a mix of every length
        self.planned += sum(w[1] - w[2] for _, w in work)
        size = self.opts.batch_size
        for start in range(0, len(work), size):
            batch = work[start:start + size]
            sums = self._nll_batch([(p.ids, w) for p, w in batch])
            for (p, _), s in zip(batch, sums, strict=True):
                p.nll_sum += s
            self.scored += sum(w[1] - w[2] for _, w in batch)
            if progress is not None:
                progress(self.scored, self.planned)
        for pending in group:
            yield pending.result()

    def _nll_batch(self, batch: list[tuple[list[int], tuple[int, int, int]]]) -> list[float]:
        """Summed NLL (nats, float64) of the scored tokens of each window of `batch`."""
        import torch

        lengths = [end - begin for _, (begin, end, _) in batch]
        width = max(lengths)
        ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        rows, cols, counts = [], [], []
        for i, (tokens, (begin, end, first)) in enumerate(batch):
            ids[i, : end - begin] = torch.tensor(tokens[begin:end])
            mask[i, : end - begin] = 1
            # The logits at window position j predict token j + 1: the scored tokens
            # [first, end) are predicted from positions [first - 1, end - 1) - begin.
            positions = range(first - 1 - begin, end - 1 - begin)
            rows.extend([i] * len(positions))
            cols.extend(positions)
            counts.append(len(positions))
        row_index = torch.tensor(rows)
        col_index = torch.tensor(cols)
        device = self.lm.device
        with torch.inference_mode():
            hidden = self._body(ids.to(device),
                                None if min(lengths) == width else mask.to(device))  # (B, T, H)
            picked = hidden[row_index.to(device), col_index.to(device)]  # (N, H)
            targets = ids[row_index, col_index + 1].to(device)  # (N,)
            nll = self._token_nll(picked, targets).double().cpu()  # (N,)
        return [float(part.sum()) for part in torch.split(nll, counts)]

    def _token_nll(self, hidden: Any, targets: Any) -> Any:
        """-log p(target) for each row of `hidden` (N, H): the LM head a chunk at a time."""
        import torch
        import torch.nn.functional as F

        vocab = self._head_vocab()
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        for start in range(0, hidden.shape[0], chunk):
            logits = self._head(hidden[start:start + chunk])  # (C, V), model dtype
            # Upcast only these rows: the log-softmax of bfloat16 logits loses digits.
            out[start:start + chunk] = F.cross_entropy(logits.float(), targets[start:start + chunk],
                                                       reduction="none")
        return out

    def _head_vocab(self) -> int:
        return int(getattr(self.lm.model.config, "vocab_size", 0) or 50_000)


def split_model(model: Any) -> tuple[Callable[[Any, Any], Any], Callable[[Any], Any]]:
    """(body, head): hidden states of a batch, and the LM head (with its scaling) on rows.

    The split is checked once against the model's own forward on a few tokens; where they
    disagree (an architecture that does more after its head than we know of) the full forward
    is used instead, correct but with full-vocabulary logits for every position.
    """
    import torch

    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)

    def body(ids: Any, mask: Any) -> Any:
        out = base(input_ids=ids, attention_mask=mask, use_cache=False)
        return out[0]  # last_hidden_state, (B, T, H)

    def lm_head(hidden: Any) -> Any:
        logits = head(hidden)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def full_body(ids: Any, mask: Any) -> Any:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)

    def identity(logits: Any) -> Any:
        return logits

    if base is None or base is model or head is None:
        log.info("scoring with the model's full forward (no separate LM head found)")
        return full_body, identity
    probe = torch.tensor([[1, 2, 3, 4]], device=model.device) % int(config.vocab_size or 5)
    with torch.inference_mode():
        try:
            expected = model(input_ids=probe, use_cache=False).logits[0].float()  # (4, V)
            got = lm_head(body(probe, None)[0]).float()
        except Exception as exc:  # an unusual signature: the full forward still works
            log.info("scoring with the model's full forward (%s)", exc)
            return full_body, identity
    tolerance = 1e-3 * float(expected.abs().max()) + 1e-4
    if got.shape != expected.shape or float((got - expected).abs().max()) > tolerance:
        log.info("scoring with the model's full forward (its head is not a plain projection)")
        return full_body, identity
    return body, lm_head


def score_texts(lm: LoadedModel, texts: Iterable[Text], opts: ScoreOptions,
                progress: ProgressCallback | None = None) -> Iterator[TextScore]:
    """Score each input with `lm`; results in input order (see :class:`Scorer`)."""
    return Scorer(lm, opts).score(texts, progress)
