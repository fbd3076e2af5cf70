"""Log-probabilities of generated tokens (``generate --logprobs K``), in OpenAI's shape.

Reported are the model's own log-probabilities: log_softmax of its raw logits at each step,
before temperature, top-k/top-p or penalties reshape the distribution that is sampled from.
That is what OpenAI's logprobs and vLLM (``logprobs_mode="raw_logprobs"``, its default)
report, and it does not depend on the sampling settings: a token sampled at temperature 1.5 is
reported with the probability the model gave it. generate() returns those raw logits with
``output_logits=True`` (``output_scores`` would be the processed ones).

Kept out of nlgen.engine.generation so that generation calls a small hook: request(), unpack(),
attach().

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nlgen.errors import UsageError
from nlgen.jsonl import json_float
from nlgen.score.likelihood import TokenLogprob, TopLogprob
from nlgen.score.token_bytes import TokenText


def check(logprobs: int | None, num_beams: int | None) -> None:
    """A usage error for a --logprobs that cannot be honoured."""
    if logprobs is None:
        return
    if logprobs < 0:
        raise UsageError(f"--logprobs must be 0 or more (got {logprobs})")
    if (num_beams or 1) > 1:
        raise UsageError("--logprobs does not work with beam search: a beam's tokens come "
                         "from steps of other beams", hint="drop --num-beams")


def request(logprobs: int | None) -> dict[str, Any]:
    """generate()'s arguments that return each step's raw logits (with --logprobs only)."""
    if logprobs is None:
        return {}
    return {"output_logits": True, "return_dict_in_generate": True}


def unpack(output: Any) -> tuple[Any, Any]:
    """(sequences, per-step logits or None) from generate()'s tensor or its output object."""
    if hasattr(output, "sequences"):
        return output.sequences, output.logits  # logits: a tuple of (B * N, V), one a step
    return output, None


def attach(tokenizer: Any, results: list[list[Any]], step_logits: Any,
           new_tokens: list[list[int]], per_prompt: int, top_k: int) -> list[list[Any]]:
    """Each Generation of `results` with its tokens' log-probs and the top_k at each step.

    Row ``b * per_prompt + s`` of the step logits belongs to prompt b's sequence s; a
    generation's tokens are the first ``completion_tokens`` of its row (EOS included).
    """
    text = TokenText(tokenizer)
    k = min(top_k, int(step_logits[0].shape[-1])) if step_logits else 0
    return [[dataclasses.replace(gen, logprobs=_tokens(
        text, step_logits, b * per_prompt + gen.sequence,
        new_tokens[b * per_prompt + gen.sequence][: gen.completion_tokens], k))
        for gen in gens] for b, gens in enumerate(results)]


def one(text: TokenText, scores: Any, token: int, top_k: int) -> TokenLogprob:
    """The log-prob of ``token`` under the raw logits ``scores`` (1, V), with the top_k."""
    return _tokens(text, [scores], 0, [token], min(top_k, int(scores.shape[-1])))[0]


def _tokens(text: TokenText, step_logits: Any, row: int, ids: list[int],
            k: int) -> tuple[TokenLogprob, ...]:
    import torch

    if not ids:  # nothing generated (--max-time ran out first)
        return ()
    logits = torch.stack([step_logits[t][row] for t in range(len(ids))])  # (T, V)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (T, V), float32 as in scoring
    chosen = logprobs.gather(1, torch.tensor(ids, device=logprobs.device)[:, None])  # (T, 1)
    top_lp, top_ids = logprobs.topk(k, dim=-1)  # (T, K), most likely first
    return tuple(
        TokenLogprob(**_token(text, token), logprob=lp,
                     top=tuple(TopLogprob(**_token(text, i), logprob=v)
                               for v, i in zip(values, indices, strict=True)))
        for token, lp, values, indices in zip(ids, chosen[:, 0].tolist(), top_lp.tolist(),
                                              top_ids.tolist(), strict=True))


def _token(text: TokenText, token_id: int) -> dict[str, Any]:
    shown, raw = text(token_id)
    return {"token": shown, "token_id": token_id, "bytes": raw}


def openai_content(tokens: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    """Tokens with their log-probs in OpenAI's shape: {token, logprob, bytes, top_logprobs}.

    ``top_logprobs`` is always there, empty when no alternatives were asked for.
    """
    return [{"token": t.token, "logprob": json_float(t.logprob), "bytes": list(t.bytes),
             "top_logprobs": [{"token": a.token, "logprob": json_float(a.logprob),
                               "bytes": list(a.bytes)} for a in t.top]}
            for t in tokens]
