"""Generation: an options dataclass -> batched ``generate()``, streaming, stop strings.

Prompts come in as an iterator (possibly endless: ``producer | nlgen generate``). They are read a
window at a time, sorted by token length inside the window so that each batch wastes little on
padding, generated in batches with left padding, and yielded back in input order as soon as
every earlier prompt is done.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nlgen.batching import read_windows, run_in_order
from nlgen.engine import decode, token_logprobs
from nlgen.engine.options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions
from nlgen.engine.sampling import build_generation_config, seeded_generate
from nlgen.engine.streaming import StopAwareStreamer, StopStrings, completion_end
from nlgen.errors import InputError, NlgenError, UsageError, first_line
from nlgen.inputs import Prompt
from nlgen.models.loading import LoadedModel
from nlgen.score.likelihood import TokenLogprob

log = logging.getLogger("nlgen")

@dataclass(frozen=True)
class Generation:
    """One generated sequence."""

    index: int  # the prompt's position in the input (0-based)
    sequence: int  # which of --num-return-sequences (0-based)
    prompt: str
    completion: str
    prompt_tokens: int  # tokens the model saw (after a chat template or truncation)
    completion_tokens: int  # tokens generated, up to the stop string or EOS (included)
    finish_reason: str  # "eos" | "stop" (a --stop string) | "length" | "time"
    line: int | None = None  # the prompt's line in its file, when read one a line
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per completion token, when asked
    seen: str | None = None  # the prompt as the model saw it, when it was cut to fit

    @property
    def text(self) -> str:
        """What the model saw and wrote: the prompt (its kept end, when it was cut to fit)
        and the completion."""
        return (self.prompt if self.seen is None else self.seen) + self.completion


@dataclass
class GenerationStats:
    """Filled in while generating: for the closing summary line."""

    prompts: int = 0
    sequences: int = 0
    new_tokens: int = 0
    seconds: float = 0.0  # time inside generate(), loading excluded

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Prepared:
    index: int
    prompt: Prompt
    ids: list[int]
    max_new: int  # this prompt's own budget of new tokens (differs under --max-length)
    notes: list[str] = field(default_factory=list)
    seen: str | None = None  # the prompt's text as the model saw it, when it was cut


def prepare(lm: LoadedModel, index: int, prompt: Prompt, opts: GenerationOptions, *,
            context: int | None = None) -> Prepared:
    """A prompt as the model will see it (chat template, tokens, cut to fit) and its budget of
    new tokens, within ``context`` tokens (default: the model's context); an InputError or
    UsageError for a prompt or option that cannot be honoured."""
    tokenizer = lm.tokenizer
    text = prompt.text
    where = f"prompt {index + 1}" + (f" (line {prompt.line})" if prompt.line else "")
    chat = opts.chat or prompt.messages is not None
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"model {lm.name!r} has no chat template",
                             hint="drop --chat and `messages` records, or use a chat-tuned "
                                  "model such as builtin")
        messages = prompt.messages or ({"role": "user", "content": prompt.text},)
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    if not ids:
        raise InputError(f"{where} is empty after tokenization")
    context = context or lm.context_length
    if opts.max_length is not None:
        if opts.max_length > context:
            raise UsageError(f"--max-length {opts.max_length} exceeds the model's context "
                             f"({context} tokens)")
        max_new = opts.max_length - len(ids)
        limit = opts.max_length - 1
    else:
        max_new = opts.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if max_new >= context:
            raise UsageError(f"--max-new-tokens {max_new} leaves no room for a prompt in the "
                             f"model's {context}-token context")
        limit = context - max_new
    notes = []
    seen = None
    if len(ids) > limit:
        if opts.max_length is not None:
            why = (f"{where} has {len(ids)} tokens; --max-length {opts.max_length} leaves room "
                   f"for {limit} (and 1 new token)")
            hint = "raise --max-length, give --max-new-tokens instead, or drop --no-truncate"
        else:
            why = (f"{where} has {len(ids)} tokens; with the new tokens it exceeds the "
                   f"model's {context}-token context")
            hint = "shorten it, lower --max-new-tokens, or drop --no-truncate"
        if not opts.truncate:
            raise InputError(why, hint=hint)
        notes.append(f"{why}: kept its last {limit} tokens")
        ids = ids[-limit:]
        # What the model saw: the record's `text` is this plus the completion.
        seen = tokenizer.decode(ids, skip_special_tokens=True)
        if opts.max_length is not None:
            max_new = opts.max_length - len(ids)
    return Prepared(index, prompt, ids, max(max_new, 1), notes, seen)


def generate(
    lm: LoadedModel,
    prompts: Iterable[str | Prompt],
    opts: GenerationOptions,
    *,
    stats: GenerationStats | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Iterator[Generation]:
    """Generate for every prompt; yield results in input order, as soon as they are ready.

    With ``on_text``, prompts are run one at a time and each one's completion is passed to
    ``on_text`` piece by piece while it is generated (stop strings already cut).
    """
    source = enumerate(p if isinstance(p, Prompt) else Prompt(p) for p in prompts)
    return generate_indexed(lm, source, opts, stats=stats, on_text=on_text)


def generate_indexed(
    lm: LoadedModel,
    source: Iterable[tuple[int, Prompt]],
    opts: GenerationOptions,
    *,
    stats: GenerationStats | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Iterator[Generation]:
    """:func:`generate` for ``(index, prompt)`` pairs whose indices are the prompts' places in
    a larger input (increasing, not necessarily consecutive: one rank's share of a job).

    The index names each result, and with ``--seed`` it picks the prompt's random stream, so a
    prompt gets the same text whichever process or batch it lands in.
    """
    stats = stats if stats is not None else GenerationStats()
    with _seeded(lm, opts.seed):
        yield from _generate_seeded(lm, source, opts, stats, on_text)


@contextlib.contextmanager
def _seeded(lm: LoadedModel, seed: int | None) -> Iterator[None]:
    """Beam sampling draws from torch's global generator (every other draw has its own
    per-prompt stream, see sampling): seeded for this call only, forked and put back after,
    so a library caller's own random state is left as it was. Not transformers.set_seed, which
    seeds Python's and NumPy's generators too and imports peft (~0.35-1.8 s)."""
    if seed is None:
        yield
        return
    import torch

    devices = [lm.device] if str(lm.device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _generate_seeded(lm: LoadedModel, source: Iterable[tuple[int, Prompt]],
                     opts: GenerationOptions, stats: GenerationStats,
                     on_text: Callable[[str], None] | None) -> Iterator[Generation]:
    import torch

    config = build_generation_config(lm, opts)
    lm.tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    batch_size = 1 if on_text else opts.batch_size

    def run_batch(batch: list[Prepared]) -> list[list[Generation]]:
        with torch.inference_mode():
            return _generate_batch(lm, batch, config, opts, stats, on_text)

    for raw_window, failure in read_windows(iter(source), batch_size):
        window: list[Prepared] = []
        try:
            for i, prompt in raw_window:
                window.append(prepare(lm, i, prompt, opts))
        except NlgenError as exc:
            failure = exc
        if not window:
            if failure is not None:
                raise failure
            return
        for item in window:
            for note in item.notes:
                log.warning(note)
        stats.prompts += len(window)
        # Sort by length so a batch pads little; emit in input order as results complete.
        for _, gens in run_in_order(window, batch_size, lambda p: len(p.ids), run_batch):
            yield from gens
        if failure is not None:
            raise failure


def _generate_batch(lm: LoadedModel, batch: list[Prepared], config: Any,
                    opts: GenerationOptions, stats: GenerationStats,
                    on_text: Callable[[str], None] | None) -> list[list[Generation]]:
    tokenizer = lm.tokenizer
    encoded = tokenizer.pad({"input_ids": [p.ids for p in batch]}, return_tensors="pt")
    input_ids = encoded["input_ids"].to(lm.device)  # (B, T) left-padded
    attention_mask = encoded["attention_mask"].to(lm.device)  # (B, T)
    max_new = max(p.max_new for p in batch)
    eos = eos_ids(config, tokenizer)
    streamer = StopAwareStreamer(tokenizer, opts.stop, on_text, eos) if on_text else None
    # Stop strings on the completion only (streaming.StopStrings), one object per batch.
    stops = StopStrings(tokenizer, opts.stop) if opts.stop else None
    beams = (config.num_beams or 1) > 1
    criteria = {"stopping_criteria": _criteria_list(
        stops.criteria(input_ids.shape[1], note=not beams))} if stops else {}
    # nlgen's loop on a lean forward where it can run the model and the options (the same
    # tokens); otherwise generate(). With --seed each sequence samples from its own stream
    # (nlgen.engine.sampling) in either.
    indices = [p.index for p in batch]
    lean = decode.runner(lm, config, rows=len(batch), seed=opts.seed, indices=indices,
                         engine=opts.engine)
    run = lean or functools.partial(seeded_generate, lm.model, seed=opts.seed,
                                    indices=indices)
    started = time.perf_counter()
    try:
        output = run(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
            max_new_tokens=max_new, streamer=streamer, **criteria,
            **token_logprobs.request(opts.logprobs),
        )  # (B * num_return_sequences, T + new)
        output, step_logits = token_logprobs.unpack(output)
    except (ValueError, TypeError) as exc:
        if not opts.extra:
            raise  # our own call with checked options: a bug, shown as one
        # generate() checks some -o values only when it builds its logits processors.
        raise UsageError(f"invalid -o value: {first_line(exc)}") from None
    elapsed = time.perf_counter() - started
    new_tokens = output[:, input_ids.shape[1]:].tolist()
    results: list[list[Generation]] = []
    n = opts.num_return_sequences
    for b, item in enumerate(batch):
        gens = []
        for s in range(n):
            row = b * n + s
            ids, completion, finish = completion_end(tokenizer, new_tokens[row], item.max_new,
                                                     eos, stops, row, noted=not beams)
            stats.new_tokens += len(ids)
            stats.sequences += 1
            gens.append(Generation(item.index, s, item.prompt.text, completion, len(item.ids),
                                   len(ids), finish, item.prompt.line, seen=item.seen))
        results.append(gens)
    stats.seconds += elapsed
    if step_logits is not None:
        results = token_logprobs.attach(lm.tokenizer, results, step_logits, new_tokens,
                                        opts.num_return_sequences, opts.logprobs or 0)
    if streamer is not None:
        streamer.finish(results[0][0].completion)
    return results


def _criteria_list(criterion: Any) -> Any:
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([criterion])


def eos_ids(config: Any, tokenizer: Any) -> set[int]:
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}
