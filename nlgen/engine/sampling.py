"""Seeded sampling with a random stream per prompt: the same draws at any batch size, on any rank.

transformers samples a whole batch from torch's one global generator, so the numbers a row
gets depend on its place in the batch and on how many steps the other rows ran: ``--seed 7``
gives other text at batch size 1 than at 8, or when another rank takes the prompt. Here each
row, named by (prompt index, sequence number), owns a ``torch.Generator`` seeded from
(seed, index, sequence), and draws exactly one uniform vector over the vocabulary per step.
The text is then the same wherever the logits are: in float32; bfloat16 rounding depends on
the batch's shape and flips near ties (README, "Same answers at any scale").

The token is chosen with the Gumbel-max trick: with G_i i.i.d. Gumbel(0, 1),
``argmax_i(log p_i + G_i)`` is an exact sample from p. The noise is added by a logits processor
and ``generate()`` runs with ``do_sample=False``, so its argmax makes the draw. Because
generate() then leaves out its warpers (temperature, top-k, ...), :func:`build_warpers` builds
them in generate's own order. The processors that do not warp (repetition penalty,
no-repeat n-grams, min new tokens, ...) stay in the generation config: generate runs them
first and appends our list after them (``GenerationMixin._get_logits_processor`` and
``_merge_criteria_processor_list`` in transformers 5.x), the order they have when sampling.

Also here: :func:`build_generation_config`, the config generate() runs with (the model's,
nlgen's defaults, the user's options; greedy decoding drops the sampling defaults).

torch and transformers are imported inside the functions that use them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nlgen.engine.extra_options import kebab
from nlgen.engine.options import GPT2_SAMPLING, SAMPLING_FIELDS, SAMPLING_OPTIONS, GenerationOptions
from nlgen.errors import UsageError, first_line

if TYPE_CHECKING:
    from nlgen.models.loading import LoadedModel

log = logging.getLogger("nlgen")


def row_seed(seed: int, index: int, sequence: int = 0) -> int:
    """The seed of one row's generator: stable across runs, processes and Python versions.

    A hash rather than arithmetic (``seed * 1000 + index``) so that nearby seeds and indices
    give unrelated streams, and a cryptographic one because ``hash()`` of strings is salted
    per process.
    """
    digest = hashlib.sha256(f"nlgen-sample:{seed}:{index}:{sequence}".encode()).digest()
    return int.from_bytes(digest[:8], "little")  # torch seeds take 64 bits


def build_warpers(config: Any, device: Any = "cpu") -> Any:
    """The warpers ``generate()`` would apply when sampling with ``config``, in its order.

    ``config`` should be complete (see :func:`resolve_config`): a field left at None here means
    "off", while generate would fill it from the model's defaults. One sequence per beam, so
    ``min_tokens_to_keep`` is 1 as in generate's sampling.
    """
    from transformers import generation as g

    warpers = g.LogitsProcessorList()
    keep = 1
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(g.TemperatureLogitsWarper(config.temperature))
    top_h = getattr(config, "top_h", None)
    if top_h is not None and hasattr(g, "TopHLogitsWarper"):  # added in transformers 5.x
        warpers.append(g.TopHLogitsWarper(top_h=top_h))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(g.TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=keep))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(g.TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=keep))
    if config.min_p is not None:  # after temperature, as in generate (and llama.cpp)
        warpers.append(g.MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=keep))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(g.TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=keep))
    epsilon = config.epsilon_cutoff
    if epsilon is not None and 0.0 < epsilon < 1.0:
        warpers.append(g.EpsilonLogitsWarper(epsilon=epsilon, min_tokens_to_keep=keep))
    eta = config.eta_cutoff
    if eta is not None and 0.0 < eta < 1.0:
        warpers.append(g.EtaLogitsWarper(epsilon=eta, min_tokens_to_keep=keep, device=device))
    return warpers


@functools.cache
def _gumbel_class() -> type:
    """The processor class, made on first use so that importing this module imports no torch."""
    import torch
    from transformers import LogitsProcessor

    class GumbelMaxSampler(LogitsProcessor):
        """Adds per-row Gumbel noise to the log-probabilities: their argmax is a sample.

        Row r draws its noise from its own generator, one ``rand(V)`` per step whether or not
        the row has finished, so its stream does not depend on the other rows of the batch,
        on padding, or on the device. The uniforms are float64, drawn on the CPU: float32 ones
        cannot come nearer to 1 than 2**-24, which caps the Gumbel tail near 17 and
        under-samples rare tokens (about 0.3% of the mass over a 50k vocabulary).
        """

        def __init__(self, seeds: Sequence[int]) -> None:
            self.generators = [torch.Generator().manual_seed(s) for s in seeds]

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            rows, vocab = scores.shape  # (B, V)
            if rows != len(self.generators):
                raise ValueError(f"{rows} rows in the batch, but seeds for {len(self.generators)}")
            logp = torch.log_softmax(scores.float(), dim=-1)  # (B, V), -inf where warped away
            uniform = torch.empty((rows, vocab), dtype=torch.float64)  # (B, V), CPU
            for row, gen in zip(uniform, self.generators):
                row.uniform_(generator=gen)  # in [0, 1)
            # G = -log(E) with E = -log(U) ~ Exp(1). E in float64 (near U = 1 it is tiny and
            # needs the digits), then float32: E's relative precision is all G needs, and
            # float32 keeps the work cheap and possible on MPS. A U of exactly 0 gives E = inf,
            # G = -inf: that token cannot win (odds 2**-53).
            live = torch.isfinite(logp).cpu()  # (B, V)
            if bool(live.all()):
                expo = (-torch.log(uniform)).float().to(logp.device)  # (B, V)
                return logp - torch.log(expo)
            # Top-k / top-p left few tokens: noise only where one can still win (same draws).
            expo = (-torch.log(uniform[live])).float().to(logp.device)  # (N,)
            live = live.to(logp.device)
            out = torch.full_like(logp, -float("inf"))
            out[live] = logp[live] - torch.log(expo)
            return out

    return GumbelMaxSampler


def gumbel_sampler(seed: int, rows: Sequence[tuple[int, int]]) -> Any:
    """A logits processor sampling row r from generator ``row_seed(seed, *rows[r])``.

    ``rows`` names each row of the batch generate() works on, as (prompt index, sequence).
    """
    return _gumbel_class()([row_seed(seed, index, sequence) for index, sequence in rows])


def resolve_config(base: Any, config: Any) -> Any:
    """``config`` with its unset fields filled the way generate() fills them.

    generate() takes None fields from the model's generation config (``base``), then from
    transformers' defaults (``top_k=50`` among them); the warpers must see the same values.
    These are the two updates of GenerationMixin._prepare_generation_config (transformers 5.x),
    done here without the model (tests/test_sampling.py checks them against it).
    """
    resolved = copy.deepcopy(config)
    if base is None:
        return resolved
    try:
        resolved.update(**base.to_dict(), defaults_only=True, allow_custom_entries=True)
        resolved.update(**base._get_default_generation_params(), defaults_only=True)
    except (AttributeError, TypeError):  # another transformers: the config as given
        return copy.deepcopy(config)
    if resolved.cache_implementation == "hybrid":
        resolved.cache_implementation = None
    return resolved


@functools.cache
def _warn_beam_sampling() -> None:
    """Once per process, not once per batch."""
    log.warning("beam sampling draws from torch's global generator: its text depends on "
                "the batch, not only on --seed")


def seeded_generate(model: Any, input_ids: Any, attention_mask: Any, *, generation_config: Any,
                    seed: int | None, indices: Sequence[int], **kwargs: Any) -> Any:
    """``model.generate(...)`` where each prompt samples from its own seeded stream.

    ``indices[b]`` is the global index of prompt row b (left padding is fine). Returns what
    generate returns: (B * num_return_sequences, T + new) ids, rows ordered p0s0, p0s1, ...,
    p1s0, ... With greedy or beam-search configs, or no seed, this is plain ``generate``; beam
    *sampling* has no per-row stream, so it falls back to generate's own sampling (with a
    notice).
    """
    config = generation_config
    if seed is None or not config.do_sample:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                              generation_config=config, **kwargs)
    if (config.num_beams or 1) > 1:
        _warn_beam_sampling()
        return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                              generation_config=config, **kwargs)
    if len(indices) != input_ids.shape[0]:
        raise ValueError(f"{len(indices)} indices for {input_ids.shape[0]} prompts")
    n = config.num_return_sequences or 1
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.extend(build_warpers(resolve_config(model.generation_config, config),
                                     input_ids.device))
    processors.append(gumbel_sampler(seed, [(i, s) for i in indices for s in range(n)]))
    greedy = copy.deepcopy(config)
    greedy.do_sample = False
    # generate() refuses num_return_sequences > 1 without sampling, so the rows are repeated
    # here, in the order generate's own expansion (repeat_interleave) would give them.
    greedy.num_return_sequences = 1
    for name in SAMPLING_FIELDS:  # off: no "set but not sampling" warnings
        if hasattr(greedy, name):
            setattr(greedy, name, None)
    return model.generate(input_ids=input_ids.repeat_interleave(n, dim=0),
                          attention_mask=attention_mask.repeat_interleave(n, dim=0),
                          generation_config=greedy, logits_processor=processors, **kwargs)


def build_generation_config(lm: LoadedModel, opts: GenerationOptions) -> Any:
    """The model's own generation config, overlaid with our defaults and the user's options.

    Only the user's options can make it an error: the sampling values of the model and of
    nlgen (GPT2_SAMPLING) are dropped when the user asks for greedy decoding (--greedy,
    --temperature 0, -o do_sample=false) or beam search.
    """
    from transformers import GenerationConfig

    base = lm.generation_config
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    if not config.do_sample:
        # The model does not ask for sampling itself: sample as in the GPT-2 examples.
        for key, value in GPT2_SAMPLING.items():
            setattr(config, key, value)
    greedy = opts.greedy_decoding
    if opts.temperature == 0:
        _say_temperature_zero(opts)
    if greedy or (opts.num_beams or 1) > 1:
        # Greedy decoding, or beam search (beam sampling only with -o do_sample=true): the
        # sampling values of the model and nlgen are unused, and must not make it an error.
        config.do_sample = False
        for name in SAMPLING_FIELDS:
            if hasattr(config, name):
                setattr(config, name, None)
    for name in ("min_new_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p",
                 "repetition_penalty", "no_repeat_ngram_size", "num_beams", "max_time"):
        value = getattr(opts, name)
        if value is not None and not (greedy and name in SAMPLING_OPTIONS):
            setattr(config, name, value)
    if not greedy and any(getattr(opts, n) is not None for n in ("temperature", "top_p",
                                                                   "top_k")):
        config.do_sample = True
    config.num_return_sequences = opts.num_return_sequences
    config.pad_token_id = lm.tokenizer.pad_token_id
    if config.eos_token_id is None:
        config.eos_token_id = lm.tokenizer.eos_token_id
    config.max_length = None
    for key, value in opts.extra:
        setattr(config, key, value)
    try:
        config.validate(strict=True)
    except TypeError:  # older transformers: validate() takes no strict flag
        config.validate()
    except ValueError as exc:
        raise UsageError(f"invalid generation options: {_first_problem(exc)}") from None
    return config


def _say_temperature_zero(opts: GenerationOptions) -> None:
    ignored = [f"--{kebab(n)}" for n in SAMPLING_OPTIONS
               if n != "temperature" and getattr(opts, n) is not None]
    if ignored:
        log.warning(f"--temperature 0 is greedy decoding: {', '.join(ignored)} ignored")
    else:
        log.info("--temperature 0: greedy decoding (the most likely token at each step)")


def _first_problem(exc: BaseException) -> str:
    """GenerationConfig.validate()'s first listed problem ("- `top_p`: ..."), on one line."""
    for line in str(exc).splitlines():
        if line.startswith("- "):
            return line[2:].strip()
    return first_line(exc)
