"""A lean decode loop for one prompt: the model's forward with a KV cache, the choice made here.

``generate()`` prepares each step through general machinery (input preparation, cache and mask
bookkeeping, stopping criteria, a logits processor list whose top-p warper sorts the whole
49k vocabulary at every step). For the common case, one prompt and one sequence with plain
sampling or greedy decoding, this loop does the same arithmetic with less around it: the same
forward (nlgen.engine.lean_llama's for a Llama; else the model's own, with a DynamicCache and
``logits_to_keep=1``), float32 logits, the same processors for the penalties, and top-k / top-p
computed on the k candidates instead of the vocabulary.

Greedy decoding gives the same tokens as ``generate()`` (tests/test_decode.py). Sampling draws
from the same distribution, but not the same tokens for a given torch seed (the multinomial
runs over k candidates, not the vocabulary), so seeded runs keep ``generate()``; so does every
configuration this loop does not know (:func:`runner` decides, from the resolved config).
Measurements: benchmarks/bench_generate.py, README "Benchmarks".

torch and transformers are imported inside the functions that use them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from nlgen.engine import sampling

# Fields this loop implements, with generate()'s semantics.
HANDLED = {"do_sample", "temperature", "top_k", "top_p", "min_new_tokens", "repetition_penalty",
           "no_repeat_ngram_size"}
# Fields that do not change a single-sequence, non-beam decode (or that we pass ourselves).
IGNORED = {"max_length", "max_new_tokens", "use_cache", "pad_token_id", "bos_token_id",
           "eos_token_id", "decoder_start_token_id", "_from_model_config", "transformers_version",
           "early_stopping", "length_penalty", "num_assistant_tokens",
           "num_assistant_tokens_schedule", "assistant_confidence_threshold",
           "assistant_lookbehind", "target_lookbehind"}
# Fields that must hold their neutral value; any other field that is set sends us to generate().
NEUTRAL = {"min_length": 0, "num_beams": 1, "num_return_sequences": 1, "typical_p": 1.0,
           "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0,
           "encoder_no_repeat_ngram_size": 0, "remove_invalid_values": False,
           "output_attentions": False, "output_hidden_states": False, "output_scores": False,
           "output_logits": False, "return_dict_in_generate": False, "diversity_penalty": 0.0,
           "num_beam_groups": 1, "renormalize_logits": False, "is_assistant": False,
           "disable_compile": False, "low_memory": False, "use_mtp": False}


def unsupported(config: Any) -> list[str]:
    """The fields of a resolved generation config that this loop cannot honour."""
    return [k for k, v in config.to_dict().items()
            if v is not None and k not in HANDLED and k not in IGNORED
            and not (k in NEUTRAL and v == NEUTRAL[k])]


def runner(lm: Any, config: Any, *, rows: int, seeded: bool = False,
           logprobs: bool = False) -> Callable[..., Any] | None:
    """``decode`` bound to the loaded model ``lm`` when it can run this request, else None
    (use generate()).

    ``rows`` is the number of prompts in the batch: only one is decoded here (a batch amortizes
    generate()'s overhead over its rows anyway). A seeded sampling run keeps generate()'s
    per-prompt random streams (nlgen.engine.sampling); ``logprobs`` needs generate()'s step logits.
    """
    if rows != 1 or logprobs or (lm.lean is None and _cache_arg(lm.model) is None):
        return None
    resolved = sampling.resolve_config(lm.generation_config, config)
    if unsupported(resolved) or (seeded and resolved.do_sample):
        return None

    def run(**kwargs: Any) -> Any:
        kwargs.pop("generation_config", None)  # `config`, resolved above
        return decode(lm, generation_config=resolved, **kwargs)

    return run


def _cache_arg(model: Any) -> str | None:
    """The name of the forward's cache argument ("cache" in transformers 5.2x), or None."""
    if getattr(model.config, "is_encoder_decoder", False):
        return None
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" not in params:
        return None
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def decode(lm: Any, *, input_ids: Any, generation_config: Any, max_new_tokens: int,
           attention_mask: Any = None, streamer: Any = None, stopping_criteria: Any = None,
           **_: Any) -> Any:
    """Decode one sequence; return it with the prompt, as ``generate()`` does: (1, T + new).

    ``generation_config`` must be resolved (:func:`sampling.resolve_config`) and pass
    :func:`unsupported`. Stops at an EOS token (kept), after ``max_new_tokens``, or when
    ``stopping_criteria`` (generate()'s kind: ``(ids, scores) -> (1,) bool``, called after
    each new token as generate() calls it) says so.
    """
    import torch

    config = generation_config
    if input_ids.shape[0] != 1 or (attention_mask is not None and not bool(attention_mask.all())):
        raise ValueError("decode() takes one unpadded prompt")
    processors = _processors(config, input_ids.shape[1])
    eos = _as_list(config.eos_token_id)
    step = stepper(lm, input_ids.shape[1] + max_new_tokens)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    tokens = input_ids  # (1, T + generated)
    step_input = input_ids
    position = 0
    for _ in range(max_new_tokens):
        scores = step(step_input, position)  # (1, V) float32
        position += step_input.shape[1]
        scores = processors(tokens, scores)
        if config.do_sample:
            token = sample(scores, config)  # (1,)
        else:
            token = torch.argmax(scores, dim=-1)  # (1,)
        step_input = token[:, None]  # (1, 1)
        tokens = torch.cat([tokens, step_input], dim=-1)
        if streamer is not None:
            streamer.put(token.cpu())
        if int(token) in eos:
            break
        if stopping_criteria is not None and bool(stopping_criteria(tokens, scores).any()):
            break
    if streamer is not None:
        streamer.end()
    return tokens


def stepper(lm: Any, max_len: int) -> Callable[[Any, int], Any]:
    """``step(ids (1, T), position) -> (1, V)`` float32 logits of the token after ``ids``.

    nlgen.engine.lean_llama's forward for the models it supports (the same arithmetic, less around
    it), else the model's own forward with a DynamicCache. Either keeps its cache between calls.
    """
    import torch

    from nlgen.engine import lean_llama
    from nlgen.models import lean_weights

    if lm.lean is None and lean_llama.supports(lm.model):
        lm.lean = lean_weights.from_model(lm.model)  # once: its fused weights are copies
    if lm.lean is not None:
        return lean_llama.LeanLlama(lm.lean, max_len).step
    from transformers import DynamicCache

    model = lm.model
    cache_kw = {_cache_arg(model): DynamicCache(config=model.config)}

    def step(ids: Any, position: int) -> Any:
        # No attention mask: one unpadded row, so the model takes the plain causal path, as
        # generate() does for an all-ones mask.
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kw).logits
        return logits[:, -1].to(dtype=torch.float32)  # (1, V), as generate() upcasts

    return step


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]


def _processors(config: Any, prompt_length: int) -> Any:
    """generate()'s processors that come before its warpers, for the fields in HANDLED."""
    from transformers import generation as g

    processors = g.LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(g.RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        processors.append(g.NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    eos = _as_list(config.eos_token_id)
    if config.min_new_tokens and eos:
        processors.append(g.MinNewTokensLengthLogitsProcessor(prompt_length,
                                                              config.min_new_tokens, eos))
    return processors


def warp(scores: Any, config: Any) -> tuple[Any, Any]:
    """generate()'s warped distribution for one row: (probabilities, token ids), both (n,).

    ``generate()`` applies temperature, top-k and top-p by masking the whole vocabulary, then
    samples over all of it; here top-k keeps its candidates (and every token tied with the k-th,
    as TopKLogitsWarper does), top-p applies TopPLogitsWarper's rule to them, and the
    probabilities cover only those candidates.
    """
    import torch

    scores = scores[0]  # (V,): one row
    if config.temperature is not None and config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k:
        k = min(config.top_k, scores.shape[-1])
        values, indices = torch.topk(scores, k)  # (k,), descending
        tied = int((scores >= values[-1]).sum())
        if tied > k:
            values, indices = torch.topk(scores, tied)
    else:
        values, indices = torch.sort(scores, descending=True)  # (V,)
    if config.top_p is not None and config.top_p < 1.0:
        # TopPLogitsWarper: in ascending order, drop the tokens whose cumulative probability
        # stays within 1 - top_p; always keep the most likely one.
        ascending = values.flip(-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - config.top_p)
        drop[-1] = False
        values = ascending.masked_fill(drop, -float("inf")).flip(-1)
    return values.softmax(dim=-1), indices


def sample(scores: Any, config: Any, generator: Any = None) -> Any:
    """Draw one token, (1,), from :func:`warp`'s distribution (torch's global RNG by default)."""
    import torch

    probs, indices = warp(scores, config)
    choice = torch.multinomial(probs, num_samples=1, generator=generator)  # (1,)
    return indices[choice]
