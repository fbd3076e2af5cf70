"""Compare a model with a reference on texts: perplexities, their ratio, KL, top-1 agreement.

Both models read the same sliding windows as ``nlgen perplexity`` (windows.plan_windows), so
each token is predicted once, by both. At each predicted position we take both log-softmaxes
(float32) and add up, in float64:

- each model's negative log-likelihood of the actual token (-> two perplexities, their ratio);
- KL(reference || model) = sum_v p_ref(v) * (log p_ref(v) - log p_model(v)), nats: how much
  the model's distribution has moved away from the reference's, over the whole vocabulary;
- whether both models rank the same token first (top-1 agreement).

Memory stays bounded: texts are read a group at a time, the body runs once per batch of windows
(B, T, H), and the two LM heads run on a chunk of scored rows at a time (nlgen.score.kernel),
so at most ``CHUNK_ELEMENTS`` logits per model exist at once: never (B, T, V).

A LoRA fine-tune can be compared with its base without a second copy in memory: pass no
reference model and a ``reference_ctx`` that switches the adapter off (peft's
``model.disable_adapter``); every reference forward then runs inside it.

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from nlgen.errors import ModelError, UsageError
from nlgen.inputs import Text
from nlgen.models.adapters import ReferenceContext
from nlgen.models.loading import LoadedModel
from nlgen.score.kernel import Batch, head_vocab, hidden_rows, score_rows, split_model
from nlgen.score.scoring import Method, ScoreOptions, TextScore, safe_exp, text_metrics
from nlgen.score.windows import Pending, ProgressCallback, WindowResult, WindowRunner

log = logging.getLogger("nlgen")

_PROBE = "The quick brown fox, 42 times: naïve café – 日本語.\n\tEnd"  # spaces, digits, UTF-8


@dataclass(frozen=True)
class Divergence:
    """Sums over the predicted tokens of one or more texts, and the metrics derived from them."""

    reference_nll_sum: float  # nats, the reference's -log p(token), summed (float64)
    nll_sum: float  # nats, the model's
    kl_sum: float  # nats, KL(reference || model) summed over positions
    agree: int  # positions where both models rank the same token first
    tokens: int  # positions (tokens predicted)

    @property
    def reference_perplexity(self) -> float:
        return safe_exp(self.reference_nll_sum / self.tokens) if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return safe_exp(self.nll_sum / self.tokens) if self.tokens else math.nan

    @property
    def ratio(self) -> float:
        """perplexity / reference_perplexity (from the sums, so no overflow of either)."""
        if not self.tokens:
            return math.nan
        return safe_exp((self.nll_sum - self.reference_nll_sum) / self.tokens)

    @property
    def kl(self) -> float:
        """Mean KL(reference || model) per token, nats."""
        return self.kl_sum / self.tokens if self.tokens else math.nan

    @property
    def agreement(self) -> float:
        """Share of positions where both models' most likely token is the same."""
        return self.agree / self.tokens if self.tokens else math.nan


@dataclass(frozen=True)
class TextComparison(WindowResult):
    """The result for one input: its sums, or why it could not be compared."""

    metrics: Divergence | None  # None when `error` is set


def total(results: Iterable[TextComparison]) -> Divergence:
    """Corpus-level sums over the compared inputs (token-weighted, like one long text)."""
    good = [r.metrics for r in results if r.metrics is not None]
    return Divergence(reference_nll_sum=math.fsum(m.reference_nll_sum for m in good),
                      nll_sum=math.fsum(m.nll_sum for m in good),
                      kl_sum=math.fsum(m.kl_sum for m in good),
                      agree=sum(m.agree for m in good), tokens=sum(m.tokens for m in good))


# ----------------------------------------------------------------------------- the tokenizer


def check_same_tokenizer(a: Any, b: Any) -> None:
    """Raise ModelError unless tokenizers `a` and `b` turn text into the same token ids.

    Per-token comparisons (KL, agreement) only mean something over one vocabulary: the same
    tokens with the same ids, the same special tokens added, the same split of a text.
    """
    hint = "compare models of one family (a fine-tune and its base, two quantizations)"
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if vocab_a != vocab_b:
        differ = sorted(t for t in vocab_a.keys() | vocab_b.keys()
                        if vocab_a.get(t) != vocab_b.get(t))
        sample = ", ".join(f"{t!r}: {vocab_a.get(t)} vs {vocab_b.get(t)}" for t in differ[:3])
        raise ModelError(f"the two models' tokenizers differ: vocabularies of {len(vocab_a)} and "
                         f"{len(vocab_b)} tokens, {len(differ)} tokens differ ({sample})",
                         hint=hint)
    ids_a, ids_b = list(a(_PROBE)["input_ids"]), list(b(_PROBE)["input_ids"])
    if ids_a != ids_b:
        raise ModelError("the two models' tokenizers share a vocabulary but split text "
                         f"differently ({len(ids_a)} vs {len(ids_b)} tokens for a sample)",
                         hint=hint)


def _check_models(lm: LoadedModel, reference: LoadedModel) -> None:
    if reference.tokenizer is not lm.tokenizer:
        check_same_tokenizer(lm.tokenizer, reference.tokenizer)
    if reference.model is lm.model:
        return
    rows = [m.model.get_output_embeddings().weight.shape[0] for m in (lm, reference)]
    if rows[0] != rows[1]:
        raise ModelError(f"the two models predict over {rows[0]} and {rows[1]} tokens",
                         hint="their output layers differ in size (padded vocabularies?)")
    if lm.device != reference.device:
        raise UsageError(f"the two models are on different devices ({lm.device}, "
                         f"{reference.device})", hint="load both with the same --device")


# ----------------------------------------------------------------------------- comparing


def _result(pending: Pending) -> TextComparison:
    if pending.error is not None:
        return TextComparison(pending.input, None, len(pending.ids), error=pending.error,
                              hint=pending.hint)
    ref, nll, kl, agree = pending.sums
    metrics = Divergence(ref, nll, kl, int(agree), pending.predicted)
    return TextComparison(pending.input, metrics, len(pending.ids), windows=len(pending.windows),
                          unscored=pending.unscored)


class Comparer(WindowRunner):
    """A model and its reference, ready to compare on texts with fixed options.

    ``reference=None`` means the model itself, read inside ``reference_ctx()`` (an adapter
    switched off); one of the two is needed.
    """

    verb = "compare"
    quantities = 4  # reference nll, model nll, KL, top-1 agreements

    def __init__(self, lm: LoadedModel, opts: ScoreOptions, *,
                 reference: LoadedModel | None = None,
                 reference_ctx: ReferenceContext | None = None) -> None:
        if reference is None and reference_ctx is None:
            raise UsageError("nothing to compare the model with",
                             hint="give a reference model, or an adapter to switch off")
        self.reference = reference or lm
        _check_models(lm, self.reference)
        super().__init__(lm, opts, context=min(lm.context_length, self.reference.context_length))
        self.method = Method(self.max_length, self.stride, self.bos, self.eos, lm.dtype,
                             lm.device)
        self._ctx: ReferenceContext = reference_ctx or contextlib.nullcontext
        self._model = split_model(lm.model)
        same = self.reference.model is lm.model
        self._ref = self._model if same else split_model(self.reference.model)

    def compare(self, texts: Iterable[Text],
                progress: ProgressCallback | None = None) -> Iterator[TextComparison]:
        """A result per input, in input order, a read-ahead group at a time (as Scorer)."""
        return (_result(p) for p in self.run(texts, progress))

    def compare_ids(self, sequences: Iterable[list[int]],
                    progress: ProgressCallback | None = None) -> Iterator[TextComparison]:
        """As :meth:`compare`, on sequences already tokenized (finetune's validation blocks)."""
        prepared = (self.plan(Pending(Text(f"sequence {i}"), list(ids)))
                    for i, ids in enumerate(sequences))
        return (_result(p) for p in self.run_prepared(prepared, progress))

    def batch_sums(self, batch: Batch) -> list[list[float]]:
        """[reference nll, model nll, KL, agreements] summed over each window's scored tokens."""
        import torch

        body, head = self._model
        ref_body, ref_head = self._ref

        def reference_head(rows: Any) -> Any:
            with self._ctx():  # an adapter may sit on the LM head too
                return ref_head(rows)

        with torch.inference_mode():
            hidden = hidden_rows(body, batch)  # (N, H)
            with self._ctx():
                ref_hidden = hidden_rows(ref_body, batch)  # (N, H)
            rows = score_rows(head, hidden, batch.targets, vocab=head_vocab(self.lm.model),
                              ref_head=reference_head, ref_hidden=ref_hidden)
        per_row = torch.stack([-rows.ref_logprob, -rows.logprob, rows.kl, rows.agree.double()],
                              dim=1)  # (N, 4) float64
        return [part.sum(dim=0).tolist() for part in torch.split(per_row, batch.counts)]


def compare_texts(lm: LoadedModel, texts: Iterable[Text], opts: ScoreOptions, *,
                  reference: LoadedModel | None = None,
                  reference_ctx: ReferenceContext | None = None,
                  progress: ProgressCallback | None = None) -> Iterator[TextComparison]:
    """Compare `lm` with `reference` (or with itself inside `reference_ctx`) on each input."""
    return Comparer(lm, opts, reference=reference, reference_ctx=reference_ctx).compare(
        texts, progress)


# ----------------------------------------------------------------------------- as a perplexity


@dataclass(frozen=True)
class ComparedScore(TextScore):
    """A perplexity result that carries its comparison with the reference as well."""

    divergence: Divergence | None = None
    reference: str | None = None  # the reference model's name, as shown


class ReferenceScorer:
    """A Comparer with scoring.Scorer's interface: ``perplexity --reference`` swaps one in.

    The model's perplexity comes from the same pass as the comparison (its nll is summed there
    anyway), so comparing costs the reference's forward passes and nothing more.
    """

    def __init__(self, comparer: Comparer, reference_name: str | None = None) -> None:
        self.comparer = comparer
        self.method = comparer.method
        self.reference_name = reference_name or comparer.reference.name

    @property
    def scored(self) -> int:
        return self.comparer.scored

    def score(self, texts: Iterable[Text],
              progress: ProgressCallback | None = None) -> Iterator[ComparedScore]:
        for r in self.comparer.compare(texts, progress):
            d = r.metrics
            metrics = None if d is None else text_metrics(r.input.text, d.nll_sum, d.tokens,
                                                          r.unscored)
            yield ComparedScore(r.input, metrics, r.input_tokens, r.windows, r.error, r.hint,
                                r.unscored, divergence=d, reference=self.reference_name)
