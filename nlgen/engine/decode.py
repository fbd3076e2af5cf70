"""nlgen's decode loop: prompts in, generate()'s output out, on a lean forward.

``generate()`` prepares each step through general machinery (input preparation, cache and mask
bookkeeping, stopping criteria, a logits processor list whose top-p warper sorts the whole
49k vocabulary at every step). For the requests this loop knows, it does the same arithmetic
with less around it: a lean forward of the model (nlgen.engine.lean_gpt2 for GPT-2, lean_llama
for the Llama family), each sequence in its own slot of the cache (nlgen.engine.slots: no
padding, so a prompt gets the same tokens alone and in a batch), float32 logits, and per
sequence generate()'s processors and warpers with a seeded Gumbel-max draw
(nlgen.engine.choosing). It takes generate()'s arguments and returns what generate() returns,
so the rest of generation does not know which loop ran.

Greedy decoding gives the same tokens as ``generate()``, and seeded sampling the same tokens as
nlgen's seeded ``generate()`` (nlgen.engine.sampling), in float32 (tests/test_decode.py,
tests/test_engine_equivalence.py). Beam search, ``max_time``, output scores and every model
without a lean forward keep ``generate()`` (:func:`runner` decides, from the resolved config and
the model; ``--engine`` can insist on either side). Measurements: benchmarks/bench_generate.py,
README "Benchmarks".

torch and transformers are imported inside the functions that use them.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from nlgen.engine import sampling
from nlgen.errors import ModelError, NlgenError, UsageError

log = logging.getLogger("nlgen")

# Fields this loop implements, with generate()'s semantics (nlgen.engine.choosing).
HANDLED = {"do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "top_h",
           "epsilon_cutoff", "eta_cutoff", "min_new_tokens", "min_length",
           "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
           "num_return_sequences"}
# Fields that do not change a non-beam decode (or that we pass ourselves).
IGNORED = {"max_length", "max_new_tokens", "use_cache", "pad_token_id", "bos_token_id",
           "eos_token_id", "decoder_start_token_id", "_from_model_config", "transformers_version",
           "early_stopping", "length_penalty", "num_assistant_tokens",
           "num_assistant_tokens_schedule", "assistant_confidence_threshold",
           "assistant_lookbehind", "target_lookbehind"}
# Fields that must hold their neutral value; any other field that is set sends us to generate().
NEUTRAL = {"num_beams": 1, "encoder_repetition_penalty": 1.0,
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


def runner(lm: Any, config: Any, *, rows: int = 1, seed: int | None = None,
           indices: list[int] | None = None, engine: str = "auto",
           ) -> Callable[..., Any] | None:
    """:func:`decode` bound to the loaded model ``lm`` when it can run this request, else None
    (use generate()).

    ``rows``: the prompts in the batch (for the notice); ``seed`` and ``indices`` (each row's
    prompt index) pick every sequence's random stream, as nlgen's seeded generate() does. The
    model must have a lean forward (:func:`lean_reason`): an architecture or config nlgen does
    not know goes to generate(), never to a guess. ``engine``: "auto" decides so;
    "transformers" always answers None; "nlgen" raises, naming why, where "auto" would fall back
    (UsageError for the request, ModelError for the model). -v says which ran, and why.
    """
    if engine == "transformers":
        _notice(lm, "transformers' generate() (--engine transformers)")
        return None
    resolved = sampling.resolve_config(lm.generation_config, config)
    why = _request_reason(resolved)
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
        return decode(lm, generation_config=resolved, seed=seed, indices=indices, **kwargs)

    return run


def _request_reason(resolved: Any) -> str | None:
    """What in a request only generate() does, in the user's terms; None: the loop does it."""
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
           seed: int | None = None, indices: list[int] | None = None,
           output_logits: bool = False, return_dict_in_generate: bool = False,
           **_: Any) -> Any:
    """Decode every prompt of a left-padded batch as ``generate()`` does, and return what it
    returns: (B * num_return_sequences, T + new) ids, rows p0s0, p0s1, ..., a finished row
    padded with ``pad_token_id``; with ``output_logits`` and ``return_dict_in_generate``, an
    object with ``sequences`` and ``logits`` (a tuple of (B * n, V) raw logits, one a step).

    ``generation_config`` must be resolved (:func:`sampling.resolve_config`) and pass
    :func:`unsupported`. A row stops at an EOS token (kept), after ``max_new_tokens``, or when
    ``stopping_criteria`` (generate()'s kind: ``(ids, scores) -> (B * n,) bool``, called on
    the whole batch after each step, as generate() calls it) says so. ``streamer`` (one prompt,
    one sequence) gets the prompt, then each token. With ``seed``, sequence s of prompt row b
    draws from ``sampling.row_seed(seed, indices[b], s)``.
    """
    import torch

    from nlgen.engine.choosing import Chooser, as_list
    from nlgen.engine.slots import Slots

    config = generation_config
    n = config.num_return_sequences or 1
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids, attention_mask)]
    indices = list(indices) if indices is not None else list(range(batch))
    eos = set(as_list(config.eos_token_id))
    pad = config.pad_token_id if config.pad_token_id is not None else next(iter(eos), 0)
    rows = [(b, s) for b in range(batch) for s in range(n)]  # generate()'s row order
    slots = Slots(lm, len(rows), max(map(len, prompts)) + max_new_tokens)
    choosers, tokens = [], []  # per row: its Chooser; its prompt and new tokens
    logits = []  # per row: (1, V) logits of its next token
    for r, (b, s) in enumerate(rows):
        if s == 0:
            logits.append(slots.prefill(r, prompts[b]))
        else:  # the prompt again: its cache is the first sequence's
            slots.copy(r - s, r)
            logits.append(logits[r - s])
        row_seed = None if seed is None else sampling.row_seed(seed, indices[b], s)
        choosers.append(Chooser(config, len(prompts[b]), row_seed))
        tokens.append(list(prompts[b]))
    output = input_ids.repeat_interleave(n, dim=0)  # (B * n, T + generated)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    step_logits = []
    live = list(range(len(rows)))
    scores = torch.cat(logits)  # (B * n, V)
    for _ in range(max_new_tokens):
        if output_logits:
            step_logits.append(scores.clone())
        chosen = [pad] * len(rows)
        for r in live:
            chosen[r] = choosers[r](tokens[r], scores[r:r + 1])
            tokens[r].append(chosen[r])
        step = torch.tensor(chosen)  # (B * n,)
        output = torch.cat([output, step[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(step[:1].cpu())
        done = {r for r in live if chosen[r] in eos}
        if stopping_criteria is not None:
            stopped = stopping_criteria(output, scores)  # (B * n,) bool
            done |= {r for r in live if bool(stopped[r])}
        live = [r for r in live if r not in done]
        if not live:
            break
        stepped = slots.step({r: chosen[r] for r in live})  # (S, V), row r: slot r
        scores[:stepped.shape[0]] = stepped
    if streamer is not None:
        streamer.end()
    if output_logits and return_dict_in_generate:
        return SimpleNamespace(sequences=output, logits=tuple(step_logits))
    return output


def stepper(lm: Any, max_len: int) -> Callable[[Any, int], Any]:
    """``step(ids (1, T), position) -> (1, V)`` float32 logits of the token after ``ids``.

    The lean forward (nlgen.engine.lean_gpt2 or lean_llama: the same arithmetic, less around
    it) where :func:`lean_reason` allows it, else the model's own forward with a DynamicCache
    (for callers that score a model step by step; :func:`runner` sends such a model to
    generate()). Either keeps its cache between calls.
    """
    import torch

    from nlgen.engine.slots import Slots

    if lean_reason(lm) is None:
        return Slots(lm, 1, max_len).forward.step
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
