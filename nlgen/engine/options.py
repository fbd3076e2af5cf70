"""What a user asks of generation: one frozen dataclass, checked when it is made.

The options come from the command line, a request record or (later) an HTTP request; every
contradiction the user can write is refused here, before any model loads, with the user's own
option named (never a default of nlgen's or of the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nlgen.engine import token_logprobs
from nlgen.engine.extra_options import kebab
from nlgen.errors import UsageError

DEFAULT_MAX_NEW_TOKENS = 50  # new tokens when neither the user nor the model says
# Sampling as in the GPT-2 examples of the Hugging Face docs ("How to generate text"), used when
# the model's own generation config does not ask for sampling itself.
GPT2_SAMPLING = {"do_sample": True, "top_k": 50, "top_p": 0.95}
# nlgen's options that only sampling uses.
SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "typical_p")
# The GenerationConfig fields that only take effect when sampling (generate's warpers).
SAMPLING_FIELDS = ("temperature", "top_h", "top_k", "top_p", "min_p", "typical_p",
                   "epsilon_cutoff", "eta_cutoff")
# Which loop generates: auto, nlgen's loop with a lean forward where it can run the
# model and the request, else transformers' generate(); nlgen insists on the first (an error
# naming why it cannot), transformers on the second (nlgen.engine.decode.runner decides).
ENGINES = ("auto", "nlgen", "transformers")


@dataclass(frozen=True)
class GenerationOptions:
    """What the user asked for; ``None`` means "the model's default, else ours"."""

    max_new_tokens: int | None = None  # tokens to add after the prompt
    max_length: int | None = None  # prompt + new tokens, as in the classic GPT-2 snippet
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    num_beams: int | None = None
    num_return_sequences: int = 1
    greedy: bool = False  # do_sample=False
    seed: int | None = None
    max_time: float | None = None  # seconds per batch, as GenerationConfig.max_time
    stop: tuple[str, ...] = ()  # cut the output before the first of these
    extra: tuple[tuple[str, Any], ...] = ()  # -o KEY=VALUE, any other GenerationConfig field
    batch_size: int = 8
    chat: bool = False  # wrap the prompt as the user turn of the model's chat template
    truncate: bool = True  # cut over-long prompts from the left (else fail)
    logprobs: int | None = None  # each new token's log-prob and this many alternatives; None: off
    engine: str = "auto"  # ENGINES

    def __post_init__(self) -> None:
        token_logprobs.check(self.logprobs, self.num_beams)
        if self.engine not in ENGINES:
            raise UsageError(f"invalid --engine {self.engine!r}",
                             hint="use one of: " + ", ".join(ENGINES))
        positive = {"max_new_tokens": self.max_new_tokens, "max_length": self.max_length,
                    "num_beams": self.num_beams, "batch_size": self.batch_size,
                    "num_return_sequences": self.num_return_sequences}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise UsageError(f"--{kebab(name)} must be at least 1 (got {value})")
        non_negative = {"min_new_tokens": self.min_new_tokens, "top_k": self.top_k,
                        "no_repeat_ngram_size": self.no_repeat_ngram_size}
        for name, value in non_negative.items():
            if value is not None and value < 0:
                raise UsageError(f"--{kebab(name)} must be 0 or more (got {value})")
        if self.temperature is not None and not 0 <= self.temperature < math.inf:
            raise UsageError(f"--temperature must be 0 (greedy) or more, and finite "
                             f"(got {self.temperature})")
        for name, value in {"repetition_penalty": self.repetition_penalty,
                            "max_time": self.max_time}.items():
            # `not 0 < value < inf` also refuses nan, which every comparison fails.
            if value is not None and not 0 < value < math.inf:
                raise UsageError(f"--{kebab(name)} must be greater than 0 and finite "
                                 f"(got {value})")
        for name, value in {"top_p": self.top_p, "typical_p": self.typical_p}.items():
            if value is not None and not 0 < value <= 1:
                raise UsageError(f"--{kebab(name)} must be in (0, 1] (got {value})")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise UsageError(f"--min-p must be in [0, 1] (got {self.min_p})")
        if self.max_new_tokens is not None and self.max_length is not None:
            raise UsageError("give --max-new-tokens or --max-length, not both")
        self._check_greedy()
        beams = self.num_beams or 1
        greedy = self.greedy or self.temperature == 0
        if self.num_return_sequences > 1 and greedy and self.num_return_sequences > beams:
            raise UsageError("greedy decoding gives one sequence per prompt; use "
                             "--num-beams >= --num-return-sequences, or drop --greedy")
        beam_sampling = dict(self.extra).get("do_sample") is True
        if beams > 1 and not beam_sampling and self.num_return_sequences > beams:
            raise UsageError(f"beam search returns at most --num-beams sequences ({beams}), not "
                             f"{self.num_return_sequences}",
                             hint="raise --num-beams, or lower --num-return-sequences")
        if any(s == "" for s in self.stop):
            raise UsageError("--stop needs a non-empty string")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must be in [0, 2**32) (got {self.seed})")

    def _check_greedy(self) -> None:
        """The user's own options contradict each other (never nlgen's or the model's
        defaults): --greedy or -o do_sample=false with a sampling option, or with
        -o do_sample=true. --temperature 0 is greedy too, as in OpenAI's API and llama.cpp; the
        sampling options given with it are ignored, as there (build_generation_config says so).
        """
        do_sample = dict(self.extra).get("do_sample")
        said = ("--greedy" if self.greedy else "--temperature 0" if self.temperature == 0
                else "-o do_sample=false" if do_sample is False else None)
        if said is None:
            return
        if do_sample is True:
            raise UsageError(f"{said} does not sample; drop -o do_sample=true")
        extra = [k for k, _ in self.extra if k in SAMPLING_FIELDS]
        if extra:  # -o is explicit: never ignored
            raise UsageError(f"{said} does not sample; drop -o {extra[0]}")
        if said != "--temperature 0":
            sampling = [n for n in SAMPLING_OPTIONS if getattr(self, n) is not None
                        and not (n == "temperature" and self.temperature == 0)]
            if sampling:
                raise UsageError(f"{said} does not sample; drop --{kebab(sampling[0])}")

    @property
    def greedy_decoding(self) -> bool:
        """--greedy, --temperature 0 or -o do_sample=false: the most likely token each step."""
        return (self.greedy or self.temperature == 0
                or dict(self.extra).get("do_sample") is False)

    @property
    def streamable(self) -> bool:
        return self.num_return_sequences == 1 and (self.num_beams or 1) == 1
