"""``-o KEY=VALUE``: any GenerationConfig field nlgen has no option for, checked before loading.

Keys with an option of their own are refused (two ways to say one thing, and the option would
silently win), and so are keys nlgen sets itself. Values are checked by GenerationConfig here;
what only generate() checks is reported by generation as a usage error when it raises.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

from nlgen.errors import UsageError, first_line


def kebab(name: str) -> str:
    """A GenerationConfig field as its command-line option: ``top_p`` -> ``top-p``."""
    return name.replace("_", "-")


# -o keys refused: those with an option of their own (two ways to say one thing, and the option
# would silently win), and those nlgen sets itself because the output's shape depends on them.
OWN_OPTION = {name: f"--{kebab(name)}" for name in (
    "max_new_tokens", "max_length", "min_new_tokens", "temperature", "top_k", "top_p", "min_p",
    "typical_p", "repetition_penalty", "no_repeat_ngram_size", "num_beams",
    "num_return_sequences", "max_time")} | {"stop_strings": "--stop"}
SET_BY_NLGEN = ("pad_token_id", "return_dict_in_generate", "output_scores", "output_logits",
                "output_attentions", "output_hidden_states", "transformers_version",
                "_from_model_config", "compile_config", "continuous_batching_config")


def _real(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# -o values whose range transformers documents (GenerationConfig's docstring and the checks of
# its logits processors): generate() would otherwise skip a value out of range without a word
# (epsilon_cutoff=5 turns epsilon sampling off) or fail in the middle of a run.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epsilon_cutoff": (lambda v: _real(v) and 0 < v < 1, "a number strictly between 0 and 1"),
    "eta_cutoff": (lambda v: _real(v) and 0 < v < 1, "a number strictly between 0 and 1"),
    "top_h": (lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "encoder_repetition_penalty": (lambda v: _real(v) and v > 0, "a number greater than 0"),
    "min_length": (lambda v: _count(v, 0), "an integer, 0 or more"),
    "encoder_no_repeat_ngram_size": (lambda v: _count(v, 0), "an integer, 0 or more"),
    "num_beam_groups": (lambda v: _count(v, 1), "an integer, 1 or more"),
} | {name: (lambda v: isinstance(v, bool), "true or false") for name in (
    "do_sample", "use_cache", "renormalize_logits", "remove_invalid_values", "low_memory",
    "token_healing", "disable_compile", "use_mtp")}


def check_range(key: str, value: Any) -> None:
    """A usage error for a -o value outside the range transformers documents for ``key``."""
    rule = RANGES.get(key)
    if rule is not None and not rule[0](value):
        raise UsageError(f"-o {key} must be {rule[1]} (got {json.dumps(value)})")


def parse_extra_options(pairs: Iterable[str]) -> tuple[tuple[str, Any], ...]:
    """``-o KEY=VALUE`` -> ((key, value), ...), each key and value checked by GenerationConfig.

    Values are JSON (``true``, ``0.6``, ``[[1, 2]]``), or Python literals, or else plain strings.
    What GenerationConfig can check without a model is checked here, before any model loads;
    what only generate() checks is reported as a usage error when it raises.
    """
    pairs = list(pairs)
    if not pairs:
        return ()
    from transformers import GenerationConfig

    known = set(GenerationConfig().to_dict()) - set(SET_BY_NLGEN)
    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"-o expects KEY=VALUE (got {pair!r})")
        if key in OWN_OPTION:
            raise UsageError(f"-o {key} has an option of its own", hint=f"use {OWN_OPTION[key]}")
        if key in SET_BY_NLGEN:
            raise UsageError(f"-o {key}: nlgen sets this itself")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known | set(OWN_OPTION)), n=3,
                                              cutoff=0.5)
            hint = ("did you mean " + ", ".join(close) + "?") if close else (
                "see GenerationConfig in the transformers docs for the fields")
            raise UsageError(f"unknown generation option {key!r}", hint=hint)
        value = _parse_value(raw.strip())
        check_range(key, value)
        parsed.append((key, value))
    _validate_extra(GenerationConfig, dict(parsed))
    return tuple(parsed)


def _validate_extra(config_class: Any, extra: dict[str, Any]) -> None:
    """GenerationConfig's own checks on the -o values, in a config where every one is used."""
    import warnings

    # Sampling and beams on, so that validate() judges the values rather than warning that a
    # sampling or beam flag is unused.
    trial = {"do_sample": True, "num_beams": 2, **extra}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config_class(**trial).validate(strict=True)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid -o value: {first_line(exc)}") from None


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        pass
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


