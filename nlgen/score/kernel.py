"""The scoring kernel: packed rows of hidden states -> per-row log-probabilities.

``perplexity`` (nlgen.score.scoring), ``score`` (nlgen.score.likelihood), ``--reference`` and
finetune's KL (nlgen.score.compare) all end the same way: the model's body runs over a
right-padded batch (B, T, H), the positions that predict a token are gathered into packed rows
(N, H), and each row's distribution over the vocabulary gives one or more numbers. Here, once:

- :func:`pack_rows`: token sequences -> a right-padded batch, the (row, col) of each predicting
  position and the token it predicts;
- :func:`split_model`: the model's body and its LM head apart, so that the head runs only on
  the rows that are scored;
- :func:`score_rows`: the LM head a chunk of rows at a time (at most ``CHUNK_ELEMENTS`` logits
  exist at once: never (B, T, V)), the log-softmax of each chunk in float32, and what the caller
  asks of each row: log p(target), whether the target is the argmax, the top k, and against a
  reference's rows KL(reference || model), the reference's log p(target) and top-1 agreement.

Sums are the callers' (float64, per window or per request); the kernel hands back float32
log-probabilities widened to float64 (exactly) and each row's KL summed over the vocabulary in
float64.

Core module: no typer, no rich, no printing; torch is imported inside functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("nlgen")

CHUNK_ELEMENTS = 1 << 23  # logits per chunk of the LM head (8 M: 32 MB in float32)

Head = Callable[[Any], Any]  # rows (C, H) -> logits (C, V)
Body = Callable[[Any, Any], Any]  # ids (B, T), mask (B, T) or None -> hidden states (B, T, H)


# ----------------------------------------------------------------------------- packing


@dataclass
class Batch:
    """Sequences as one batch: ids, mask, and which positions predict which tokens."""

    ids: Any  # (B, T) long, right-padded, on the device
    mask: Any | None  # (B, T), None when no sequence is padded
    where: tuple[Any, Any]  # (rows, cols) of the predicting positions, (N,) each
    targets: Any  # (N,) the tokens they predict
    counts: list[int]  # predicted tokens per sequence, to split (N,) back into sequences


def pack_rows(rows: Sequence[tuple[Sequence[int], int, Sequence[int]]], pad_id: int,
              device: Any) -> Batch:
    """Right-pad `rows` into one batch on `device`.

    Each row is ``(tokens, start, targets)``: the tokens the model reads, and the tokens
    predicted by its positions ``start, start + 1, ...`` (the logits at position j predict the
    token after j). Right padding: with causal attention a pad never reaches a real position,
    and the mask is there for the models that care.
    """
    import torch

    lengths = [len(tokens) for tokens, _, _ in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    at_rows: list[int] = []
    at_cols: list[int] = []
    targets: list[int] = []
    counts = []
    for i, (tokens, start, predicted) in enumerate(rows):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
        at_rows.extend([i] * len(predicted))
        at_cols.extend(range(start, start + len(predicted)))
        targets.extend(predicted)
        counts.append(len(predicted))
    where = (torch.tensor(at_rows, dtype=torch.long, device=device),
             torch.tensor(at_cols, dtype=torch.long, device=device))
    return Batch(ids.to(device), None if min(lengths) == width else mask.to(device), where,
                 torch.tensor(targets, dtype=torch.long, device=device), counts)


def hidden_rows(body: Body, batch: Batch) -> Any:
    """The body's output at the predicting positions of `batch`: (N, H) (or (N, V))."""
    return body(batch.ids, batch.mask)[batch.where]  # (B, T, H) -> (N, H)


# ----------------------------------------------------------------------------- the model apart


def head_vocab(model: Any) -> int:
    """The vocabulary the LM head predicts over, as the chunk size counts it."""
    return int(getattr(model.config, "vocab_size", 0) or 50_000)


def split_model(model: Any) -> tuple[Body, Head]:
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


# ----------------------------------------------------------------------------- the kernel


@dataclass(frozen=True)
class RowScores:
    """Per packed row, on the CPU; None where the caller did not ask."""

    logprob: Any  # (N,) float64: log p(target) under the model
    greedy: Any | None = None  # (N,) bool: the target is the model's most likely token
    top_logprobs: Any | None = None  # (N, K) float64, most likely first
    top_ids: Any | None = None  # (N, K) long
    ref_logprob: Any | None = None  # (N,) float64: log p(target) under the reference
    kl: Any | None = None  # (N,) float64: KL(reference || model), nats
    agree: Any | None = None  # (N,) bool: both models rank the same token first


def score_rows(head: Head, hidden: Any, targets: Any, *, vocab: int, greedy: bool = False,
               top_k: int = 0, ref_head: Head | None = None, ref_hidden: Any = None,
               chunk_elements: int | None = None) -> RowScores:
    """What each row of `hidden` (N, H) says of its target (N,): see :class:`RowScores`.

    `vocab` sets the rows per chunk: ``chunk_elements // vocab`` (``CHUNK_ELEMENTS`` unless
    given). With `ref_head` and `ref_hidden` (the reference's rows at the same positions) the
    reference's head runs on the same chunks; a caller that must run it in a context (an
    adapter switched off) wraps it.
    """
    import torch

    if (ref_head is None) != (ref_hidden is None):
        raise ValueError("a reference needs both its head and its rows")
    n, device = hidden.shape[0], hidden.device
    chunk = max(1, (chunk_elements or CHUNK_ELEMENTS) // vocab)
    against = ref_head is not None
    # Filled on the device and moved once at the end: no synchronisation per chunk.
    logprob = torch.empty(n, dtype=torch.float32, device=device)  # (N,)
    hit = torch.empty(n, dtype=torch.bool, device=device) if greedy else None  # (N,)
    top_lp = torch.empty((n, top_k), dtype=torch.float32, device=device)  # (N, K)
    top_ids = torch.empty((n, top_k), dtype=torch.long, device=device)  # (N, K)
    ref_lp = torch.empty(n, dtype=torch.float32, device=device) if against else None  # (N,)
    kl = torch.empty(n, dtype=torch.float64, device=device) if against else None  # (N,)
    agree = torch.empty(n, dtype=torch.bool, device=device) if against else None  # (N,)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        tgt = targets[part][:, None]  # (C, 1)
        # Upcast only these rows: the log-softmax of bfloat16 logits loses digits.
        lp = torch.log_softmax(head(hidden[part]).float(), dim=-1)  # (C, V)
        logprob[part] = lp.gather(1, tgt)[:, 0]
        first = lp.argmax(dim=-1) if greedy or against else None  # (C,)
        if hit is not None:
            hit[part] = first == tgt[:, 0]
        if top_k:
            top_lp[part], top_ids[part] = lp.topk(top_k, dim=-1)  # (C, K), largest first
        if against:
            assert ref_head is not None and kl is not None and agree is not None
            ref = torch.log_softmax(ref_head(ref_hidden[part]).float(), dim=-1)  # (C, V)
            ref_lp[part] = ref.gather(1, tgt)[:, 0]
            ref_p = ref.exp()  # (C, V)
            # 0 * log(0 / q) is 0, not 0 * -inf = nan: tokens the reference rules out add nothing.
            terms = torch.where(ref_p > 0, ref_p * (ref - lp), 0.0)  # (C, V)
            kl[part] = terms.sum(dim=-1, dtype=torch.float64)  # V small terms: float64
            agree[part] = first == ref.argmax(dim=-1)

    def host(t: Any) -> Any:
        # Widened on the CPU (exact), where every device has float64.
        return None if t is None else t.cpu().double() if t.is_floating_point() else t.cpu()

    return RowScores(host(logprob), host(hit), host(top_lp) if top_k else None,
                     host(top_ids) if top_k else None, host(ref_lp), host(kl), host(agree))
