"""Log-likelihood of a continuation given a context, as lm-evaluation-harness computes it.

The numbers are meant to match lm-eval's ``HFLM.loglikelihood`` (lm_eval/models/huggingface.py
and lm_eval/api/model.py: ``_encode_pair``, ``loglikelihood``, ``_loglikelihood_tokens``):

- trailing whitespace of the context moves to the front of the continuation;
- the pair is tokenized together: ``whole = tok(context + continuation)``, ``ctx = tok(context)``
  and the continuation is ``whole[len(ctx):]`` (the tokenizer's own special tokens included,
  except when the text already starts with the prefix token's text);
- an empty context is replaced by the prefix token (BOS, else EOS); when the continuation itself
  starts with that token, its first token becomes the context instead;
- too long a pair keeps its last ``max_length + 1`` tokens (the context loses tokens on its
  left) and the model reads all of them but the last;
- ``is_greedy``: every continuation token is the argmax of its distribution.

Where we differ, and why: the log-softmax is always taken in float32 (lm-eval takes it in the
model's dtype unless told otherwise: the same for float32 models), sums are float64, and the LM
head runs only at the continuation positions (nlgen.score.kernel). Batches hold requests of
similar length, longest first, right-padded, within a read-ahead group of
``batch_size * READ_AHEAD_BATCHES`` requests, so results stream out in input order.

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from nlgen.batching import read_ahead, run_in_order
from nlgen.errors import UsageError
from nlgen.models.loading import LoadedModel
from nlgen.score.kernel import head_vocab, hidden_rows, pack_rows, score_rows, split_model
from nlgen.score.token_bytes import TokenText

log = logging.getLogger("nlgen")

READ_AHEAD_BATCHES = 8  # requests read ahead = batch_size * this, sorted by length within

ProgressCallback = Callable[[int, int], None]  # (requests scored so far, requests read so far)


@dataclass(frozen=True)
class Request:
    """A context and the continuation whose log-likelihood given it is wanted."""

    context: str
    continuation: str


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position."""

    token: str  # the token decoded alone ("\ufffd" where it holds part of a UTF-8 character)
    token_id: int
    logprob: float  # natural log
    bytes: tuple[int, ...]  # the token's raw bytes (OpenAI's logprobs format)


@dataclass(frozen=True)
class TokenLogprob:
    """A continuation token, its log-probability and, when asked, the top alternatives."""

    token: str
    token_id: int
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()  # most likely first; empty unless top_k > 0


@dataclass(frozen=True)
class ContinuationScore:
    """The result for one request, or why it could not be scored."""

    request: Request
    logprob: float = 0.0  # sum over the continuation tokens, nats (float64)
    num_tokens: int = 0  # continuation tokens scored
    num_bytes: int = 0  # UTF-8 bytes of the continuation as given (lm-eval's acc_bytes)
    num_chars: int = 0  # characters of the continuation as given (lm-eval's acc_norm)
    is_greedy: bool = False  # every continuation token is the argmax at its position
    truncated: bool = False  # the context lost tokens on its left to fit the model
    context_tokens: int = 0  # context tokens the model read (after any truncation)
    tokens: tuple[TokenLogprob, ...] = ()  # filled only when asked
    error: str | None = None
    hint: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class LikelihoodOptions:
    """How to score; ``None`` means "derive from the model"."""

    batch_size: int = 8  # requests per forward pass
    max_length: int | None = None  # tokens the model reads at most; None: its context
    want_tokens: bool = False  # per-token log-probabilities in the result
    top_k: int = 0  # alternatives per continuation token (implies want_tokens)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.max_length is not None and self.max_length < 1:
            raise UsageError(f"--max-length must be positive (got {self.max_length})")
        if self.top_k < 0:
            raise UsageError(f"--top-k must not be negative (got {self.top_k})")


# ----------------------------------------------------------------------------- tokenization


def prefix_token_id(tokenizer: Any) -> int | None:
    """The token an empty context stands for: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval splits a request.

    Raises ValueError for an empty context when the tokenizer has no BOS or EOS token.
    """
    prefix = prefix_token_id(tokenizer)
    if context == "":
        if prefix is None:
            raise ValueError("empty context and the tokenizer has no BOS or EOS token to "
                             "stand for it")
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if cont and cont[0] == prefix:  # the continuation brings its own prefix token
            return cont[:1], cont[1:]
        return [prefix], cont
    # Move trailing whitespace to the continuation: "The cat" + " sat" tokenizes " sat" as one
    # word, as it would be in running text; "The cat " + "sat" would not.
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    prefix_text = tokenizer.decode([prefix]) if prefix is not None else None

    def encode(text: str) -> list[int]:
        # A text that already starts with the prefix token's text gets no second one (lm-eval).
        special = not (prefix_text and text.startswith(prefix_text))
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    whole = encode(context + continuation)
    context_ids = encode(context)
    # Not whole[:len(context_ids)]: lm-eval reads the context as encoded alone, even where the
    # joint encoding merged tokens across the boundary.
    return context_ids, whole[len(context_ids):]


# ----------------------------------------------------------------------------- scoring


@dataclass
class _Item:
    """A request on its way: its tokens, what the model reads, what came out."""

    request: Request
    context: list[int]
    continuation: list[int]
    fed: list[int]  # what the model reads: (context + continuation)[-(L + 1):][:-1]
    truncated: bool
    result: ContinuationScore | None = None  # set once scored, or at once for an error


class ContinuationScorer:
    """A loaded model ready to score continuations with fixed options."""

    def __init__(self, lm: LoadedModel, opts: LikelihoodOptions | None = None) -> None:
        self.lm = lm
        self.opts = opts or LikelihoodOptions()
        context = lm.context_length
        if self.opts.max_length is not None and self.opts.max_length > context:
            raise UsageError(f"--max-length {self.opts.max_length} is longer than the model's "
                             f"context ({context} tokens)", hint=f"use --max-length {context}")
        self.max_length = self.opts.max_length or context
        self.top_k = min(self.opts.top_k, int(lm.model.config.vocab_size or self.opts.top_k))
        self.want_tokens = self.opts.want_tokens or self.top_k > 0
        self.text = TokenText(lm.tokenizer)
        self._body, self._head = split_model(lm.model)
        pad = lm.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else 0
        self.scored = 0  # requests scored (or failed) so far
        self.read = 0  # requests read so far

    def score(self, requests: Iterable[Request],
              progress: ProgressCallback | None = None) -> Iterator[ContinuationScore]:
        """A result per request, in input order, a read-ahead group at a time."""
        ahead = self.opts.batch_size * READ_AHEAD_BATCHES
        for group in read_ahead(map(self._prepare, requests), lambda g: len(g) >= ahead):
            self.read += len(group)
            yield from self._run_group(group, progress)

    def _prepare(self, request: Request) -> _Item:
        def failed(error: str, hint: str | None = None) -> _Item:
            return _Item(request, [], [], [], False, ContinuationScore(request, error=error,
                                                                       hint=hint))

        if request.continuation == "":
            return failed("empty continuation, nothing to score")
        try:
            context, continuation = encode_pair(self.lm.tokenizer, request.context,
                                                request.continuation)
        except ValueError as exc:
            return failed(str(exc))
        if not continuation:
            return failed("the continuation has no tokens of its own (the tokenizer merged it "
                          "into the context)")
        limit = self.max_length
        if len(continuation) > limit:
            return failed(f"continuation of {len(continuation)} tokens is longer than the "
                          f"model's context ({limit} tokens)", hint="shorten the continuation")
        joined = context + continuation
        truncated = len(joined) > limit + 1
        if truncated:
            log.info("context truncated on its left: %d tokens do not fit in %d",
                     len(joined) - 1, limit)
        return _Item(request, context, continuation, joined[-(limit + 1):][:-1], truncated)

    def _run_group(self, group: list[_Item],
                   progress: ProgressCallback | None) -> Iterator[ContinuationScore]:
        """Score `group` in batches, longest first; yield its results in input order."""
        work = [item for item in group if item.result is None]
        self.scored += len(group) - len(work)

        def run(batch: list[_Item]) -> list[ContinuationScore]:
            results = self._score_batch(batch)
            self.scored += len(batch)
            if progress is not None:
                progress(self.scored, self.read)
            return results

        # lm-eval's order: longest first (the first batch shows at once whether memory holds),
        # ties by the tokens themselves, so batches and their rounding repeat run to run.
        scored = run_in_order(work, self.opts.batch_size, lambda item: (-len(item.fed), item.fed),
                              run)
        for item in group:
            if item.result is None:  # the next one scored, in input order
                _, item.result = next(scored)
            yield item.result

    def _score_batch(self, batch: Sequence[_Item]) -> list[ContinuationScore]:
        """One forward pass over `batch` (right-padded), then the head at continuation rows."""
        import torch

        # Position j predicts token j + 1: the continuation's tokens are predicted by the last
        # len(continuation) positions the model reads.
        packed = pack_rows([(item.fed, len(item.fed) - len(item.continuation), item.continuation)
                            for item in batch], self._pad_id, self.lm.device)
        with torch.inference_mode():
            rows = score_rows(self._head, hidden_rows(self._body, packed), packed.targets,
                              vocab=head_vocab(self.lm.model), greedy=True, top_k=self.top_k)
        counts = packed.counts
        n, k = len(rows.logprob), self.top_k
        top_lp = rows.top_logprobs if k else torch.empty((n, 0), dtype=torch.float64)  # (N, K)
        top_ids = rows.top_ids if k else torch.empty((n, 0), dtype=torch.long)  # (N, K)
        parts = zip(batch, torch.split(rows.logprob, counts), torch.split(rows.greedy, counts),
                    torch.split(top_lp, counts), torch.split(top_ids, counts), strict=True)
        return [self._result(item, *part) for item, *part in parts]

    def _result(self, item: _Item, target_lp: Any, greedy: Any, top_lp: Any,
                top_ids: Any) -> ContinuationScore:
        tokens: tuple[TokenLogprob, ...] = ()
        if self.want_tokens:
            tokens = tuple(self._token(t, lp, row_lp, row_ids) for t, lp, row_lp, row_ids in zip(
                item.continuation, target_lp.tolist(), top_lp.tolist(), top_ids.tolist(),
                strict=True))
        return ContinuationScore(
            item.request, logprob=math.fsum(target_lp.tolist()), num_tokens=len(item.continuation),
            num_bytes=len(item.request.continuation.encode("utf-8")),
            num_chars=len(item.request.continuation),
            is_greedy=bool(greedy.all()), truncated=item.truncated,
            context_tokens=len(item.fed) - len(item.continuation) + 1, tokens=tokens)

    def _token(self, token_id: int, logprob: float, top_lp: list[float],
               top_ids: list[int]) -> TokenLogprob:
        top = []
        for lp, i in zip(top_lp, top_ids, strict=True):
            alt_text, alt_bytes = self.text(i)
            top.append(TopLogprob(alt_text, i, lp, alt_bytes))
        text, raw = self.text(token_id)
        return TokenLogprob(text, token_id, logprob, raw, tuple(top))


def score_continuations(lm: LoadedModel, requests: Iterable[Request], *, batch_size: int = 8,
                        max_length: int | None = None, want_tokens: bool = False, top_k: int = 0,
                        progress: ProgressCallback | None = None) -> Iterator[ContinuationScore]:
    """Log-likelihood of each request's continuation given its context; results in input order.

    A request that cannot be scored (empty continuation, one longer than the model's context)
    gets a result with ``error`` set, in its place; the others are still scored.
    """
    opts = LikelihoodOptions(batch_size=batch_size, max_length=max_length,
                             want_tokens=want_tokens, top_k=top_k)
    return ContinuationScorer(lm, opts).score(requests, progress)
