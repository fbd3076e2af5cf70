"""A lean decode loop for one prompt: the model's forward with a KV cache, the choice made here.

``generate()`` prepares each step through general machinery (input preparation, cache and mask
bookkeeping, stopping criteria, a logits processor list whose top-p warper sorts the whole
49k vocabulary at every step). For the common case, one prompt and one sequence with plain
sampling or greedy decoding, this loop does the same arithmetic with less around it: a lean
forward of the model (nlgen.engine.lean_gpt2 for GPT-2, lean_llama for the Llama family),
float32 logits, the same processors for the penalties, and top-k / top-p computed on the k
candidates instead of the vocabulary.

Greedy decoding gives the same tokens as ``generate()`` (tests/test_decode.py,
tests/test_engine_equivalence.py). Sampling draws from the same distribution, but not the same
tokens for a given torch seed (the multinomial runs over k candidates, not the vocabulary), so
seeded runs keep ``generate()``; so does every configuration this loop does not know, and every
model without a lean forward (:func:`runner` decides, from the resolved config and the model;
``--engine`` can insist on either side). Measurements: benchmarks/bench_generate.py, README
"Benchmarks".

torch and transformers are imported inside the functions that use them.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

from nlgen.engine import sampling
from nlgen.errors import ModelError, NlgenError, UsageError

log = logging.getLogger("nlgen")

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


def runner(lm: Any, config: Any, *, rows: int, seeded: bool = False, logprobs: bool = False,
           engine: str = "auto") -> Callable[..., Any] | None:
    """``decode`` bound to the loaded model ``lm`` when it can run this request, else None
    (use generate()).

    ``rows`` is the number of prompts in the batch: only one is decoded here (a batch amortizes
    generate()'s overhead over its rows anyway). A seeded sampling run keeps generate()'s
    per-prompt random streams (nlgen.engine.sampling); ``logprobs`` needs generate()'s step
    logits. The model must have a lean forward (:func:`lean_reason`): an architecture or config
    nlgen does not know goes to generate(), never to a guess. ``engine``: "auto" decides so;
    "transformers" always answers None; "nlgen" raises, naming why, where "auto" would fall back
    (UsageError for the request, ModelError for the model). -v says which ran, and why.
    """
    if engine == "transformers":
        _notice(lm, "transformers' generate() (--engine transformers)")
        return None
    resolved = sampling.resolve_config(lm.generation_config, config)
    why = _request_reason(resolved, rows=rows, seeded=seeded, logprobs=logprobs)
    error: type[NlgenError] = UsageError
    if why is None:
        why, error = lean_reason(lm), ModelError
    if why is not None:
        if engine == "nlgen":
            raise error(f"--engine nlgen cannot run this: {why}",
                        hint="use --engine auto, which falls back to transformers' generate()")
        _notice(lm, f"transformers' generate(), as nlgen's loop cannot run this: {why}")
        return None
    _notice(lm, f"nlgen's loop with the lean {_family(lm)} forward")

    def run(**kwargs: Any) -> Any:
        kwargs.pop("generation_config", None)  # `config`, resolved above
        return decode(lm, generation_config=resolved, **kwargs)

    return run


def _request_reason(resolved: Any, *, rows: int, seeded: bool, logprobs: bool) -> str | None:
    """What in a request only generate() does, in the user's terms; None: the loop does it."""
    if rows != 1:
        return f"a batch of {rows} prompts (the loop decodes one at a time)"
    if logprobs:
        return "--logprobs (generate()'s step scores)"
    if seeded and resolved.do_sample:
        return "--seed with sampling (per-prompt random streams)"
    fields = unsupported(resolved)
    if fields:
        return "generation setting " + ", ".join(f"{k}={getattr(resolved, k)!r}"
                                                 for k in fields[:3])
    return None


def lean_reason(lm: Any) -> str | None:
    """Why no lean forward computes what this loaded model computes (the architecture, config
    key, device or dtype); None when one does. Weights read from the files (a saved Llama)
    answer None without building the model."""
    if lm.lean is not None:
        return None
    from nlgen.engine import lean_gpt2, lean_llama

    model = lm.model
    forward = lean_gpt2 if type(model).__name__ in lean_gpt2.ARCHITECTURES else lean_llama
    return forward.reason(model)


def _family(lm: Any) -> str:
    from nlgen.engine import lean_weights

    if lm.lean is not None:  # read from files: the Llama family only
        return "Llama-family"
    return "GPT-2" if type(lm.model).__name__ == lean_weights.GPT2 else "Llama-family"


_noticed: dict[int, set[str]] = {}  # id of a loaded model -> the notices said about it


def _notice(lm: Any, what: str) -> None:
    """-v: which engine runs, once per loaded model and reason (not once per batch)."""
    said = _noticed.get(id(lm))
    if said is None:
        said = _noticed[id(lm)] = set()
        weakref.finalize(lm, _noticed.pop, id(lm), None)  # an id outlives nothing
    if what not in said:
        said.add(what)
        log.info("engine: %s", what)


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

    The lean forward (nlgen.engine.lean_gpt2 or lean_llama: the same arithmetic, less around
    it) where :func:`lean_reason` allows it, else the model's own forward with a DynamicCache
    (for callers that score a model step by step; :func:`runner` sends such a model to
    generate()). Either keeps its cache between calls.
    """
    import torch

    from nlgen.engine import lean_gpt2, lean_llama, lean_weights

    if lean_reason(lm) is None:
        weights = lm.lean if lm.lean is not None else _from_model(lm.model)
        if isinstance(weights, lean_weights.GPT2Weights):
            return lean_gpt2.LeanGPT2(weights, max_len).step
        return lean_llama.LeanLlama(weights, max_len).step
    from transformers import DynamicCache

    model = lm.model
    params = inspect.signature(model.forward).parameters
    # The forward's cache argument: "cache" in transformers 5.2x, "past_key_values" before.
    name = "cache" if "cache" in params else "past_key_values"
    cache_kw = {name: DynamicCache(config=model.config)}

    def step(ids: Any, position: int) -> Any:
        # No attention mask: one unpadded row, so the model takes the plain causal path, as
        # generate() does for an all-ones mask.
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kw).logits
        return logits[:, -1].to(dtype=torch.float32)  # (1, V), as generate() upcasts

    return step


# A loaded model -> its lean weights, made once (fused int4 weights are copies) and let go
# with the model. Kept here, not in LoadedModel.lean (the weights read from files, which
# stand in for a model not built yet).
_made: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _from_model(model: Any) -> Any:
    from nlgen.engine import lean_weights

    if model not in _made:
        _made[model] = lean_weights.from_model(model)
    return _made[model]


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
