"""``--reference MODEL`` for ``perplexity`` and ``score``: load the pair, render the comparison.

Which models end up in memory:

- ``--reference`` names the base of a LoRA adapter directory given as ``--model`` (the exact
  ``base_model_name_or_path`` of its adapter_config.json, the same directory, or ``base``): the
  adapter model is loaded once and the reference is the same weights with the adapter switched
  off;
- ``--reference`` names ``--model`` itself: one copy, which is its own reference;
- anything else: both models are loaded, on the same device and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nlgen.cli import runtime
from nlgen.cli.options import ScoringJob
from nlgen.errors import UsageError
from nlgen.jsonl import json_float
from nlgen.models import adapters, loading
from nlgen.score import compare, scoring

BASE = "base"  # --reference base: the base model of the LoRA adapter given as --model

# The jsonl/json keys of a comparison, and their table headers.
KEYS = ("reference_perplexity", "perplexity_ratio", "kl", "top1_agreement")
HEADERS = ("ref ppl", "ratio", "KL", "top-1 agree")


@dataclass
class Models:
    """The model, and what stands for its reference: another model or an adapter switch."""

    lm: loading.LoadedModel
    reference: loading.LoadedModel | None = None
    reference_ctx: compare.ReferenceContext | None = None
    reference_name: str | None = None  # as shown in records and messages


def adapter_of(model: str | None, reference: str | None) -> str | None:
    """The adapter's base when `reference` asks for it to be switched off, else None.

    A usage error (exit 2, before anything loads) when ``--reference base`` has no adapter to
    switch off.
    """
    base = adapters.adapter_base(model) if model else None
    if reference == BASE and base is None:
        raise UsageError("--reference base needs --model to be a LoRA adapter directory "
                         "(with adapter_config.json)",
                         hint="name the reference model instead: --reference MODEL")
    if base is not None and reference is not None and (
            reference == BASE or adapters.same_model(reference, base)):
        return base
    return None


def load(job: ScoringJob, device: str) -> Models:
    """Load the job's model for scoring on `device`, and its reference when there is one (see
    the module doc). Under a launcher every rank loads its own pair."""
    model, reference, dtype = job.model, job.reference, job.dtype.value
    trust_remote_code = job.trust_remote_code
    base = adapter_of(model, reference)
    lm = loading.load_model(model, device=device, dtype=dtype,
                            trust_remote_code=trust_remote_code, purpose="score")
    runtime.use_spare_threads(lm)
    if reference is None:
        return Models(lm)
    if base is not None:
        switch = adapters.adapter_switch(lm.model)
        if switch is None:
            raise UsageError(f"{model} did not load as a LoRA adapter: nothing to switch off",
                             hint="name the reference model instead: --reference MODEL")
        return Models(lm, reference_ctx=switch, reference_name=f"{base} (adapter off)")
    if model is not None and adapters.same_model(reference, model):
        return Models(lm, reference=lm, reference_name=lm.name)
    ref = loading.load_model(reference, device=lm.device, dtype=lm.dtype,
                             trust_remote_code=trust_remote_code, purpose="score")
    return Models(lm, reference=ref, reference_name=ref.name)


def perplexity_scorer(models: Models, opts: scoring.ScoreOptions,
                      shard: tuple[int, int] = (0, 1)) -> Any:
    """scoring.Scorer, or with a reference, a scorer that also compares (same interface), of
    every ranks-th window with ``shard=(rank, ranks)``."""
    if models.reference is None and models.reference_ctx is None:
        return scoring.Scorer(models.lm, opts, shard=shard)
    comparer = compare.Comparer(models.lm, opts, reference=models.reference,
                                reference_ctx=models.reference_ctx)
    comparer.shard = shard  # a WindowRunner's: which windows of each group this rank runs
    return compare.ReferenceScorer(comparer, models.reference_name)


# ----------------------------------------------------------------------------- rendering


def divergence_fields(d: compare.Divergence | None) -> dict[str, Any]:
    """The comparison's json keys (reference_perplexity, ...), {} without one."""
    if d is None:
        return {}
    return dict(zip(KEYS, (json_float(d.reference_perplexity), json_float(d.ratio),
                           json_float(d.kl), json_float(d.agreement)), strict=True))


def fields(result: scoring.TextScore) -> dict[str, Any]:
    """A perplexity record's comparison keys: {} unless it was compared with a reference."""
    if not isinstance(result, compare.ComparedScore):
        return {}
    return {"reference_model": result.reference, **divergence_fields(result.divergence)}


def total_fields(results: Sequence[scoring.TextScore]) -> dict[str, Any]:
    """The comparison over every compared input (token-weighted), {} without a reference."""
    compared = [r for r in results if isinstance(r, compare.ComparedScore) and r.ok]
    if not compared:
        return {}
    whole = compare.total(compare.TextComparison(r.input, r.divergence) for r in compared)
    return {"reference_model": compared[0].reference, **divergence_fields(whole)}


def headers(results: Sequence[scoring.TextScore]) -> tuple[str, ...]:
    """The table's comparison columns: none unless the results were compared."""
    return HEADERS if any(isinstance(r, compare.ComparedScore) for r in results) else ()


def cells(values: dict[str, Any]) -> list[str]:
    """Table cells of a comparison's keys (from fields or total_fields); [] without one."""
    if not values:
        return []
    ppl, ratio, kl, agree = (values[k] for k in KEYS)
    return [_fmt(ppl, ".2f"), _fmt(ratio, ".4f"), _fmt(kl, ".4f"), _fmt(agree, ".3f")]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else (f"{x:{spec}}" if abs(x) < 1e6 else f"{x:.3e}")
