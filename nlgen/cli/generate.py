"""``nlgen generate``: prompts in, continuations out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import chain
from typing import Annotated, Any, Optional

import typer

from nlgen import extra_options, generation, inputs, loading
from nlgen.cli import console, runtime
from nlgen.cli.options import (
    BatchSizeOpt,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    GenerateFormat,
    ModelOpt,
    Quantize,
    QuantizeOpt,
    QuietOpt,
    SeedOpt,
    TrustRemoteCodeOpt,
    VerboseOpt,
)
from nlgen.cli.runtime import guard
from nlgen.errors import InputError, UsageError

SAMPLING = "Sampling (GenerationConfig)"
IO = "Input and output"


@guard
def generate(
    ctx: typer.Context,
    prompts: Annotated[Optional[list[str]], typer.Argument(
        help="Prompts. None: read --file, or stdin when it is piped.", show_default=False)] = None,
    file: Annotated[Optional[str], typer.Option(
        "--file", "-f", help="Read prompts from FILE, one a line ('-' is stdin).",
        rich_help_panel=IO)] = None,
    whole: Annotated[bool, typer.Option(
        "--whole", help="Take the whole input as one prompt, not one a line.",
        rich_help_panel=IO)] = False,
    fmt: Annotated[GenerateFormat, typer.Option(
        "--format", help="text, or jsonl (one object per sequence).",
        rich_help_panel=IO)] = GenerateFormat.text,
    completion_only: Annotated[bool, typer.Option(
        "--completion-only", help="Print only the continuation, not the prompt.",
        rich_help_panel=IO)] = False,
    separator: Annotated[str, typer.Option(
        "--separator", help="Line printed between outputs in text format when there are several.",
        rich_help_panel=IO)] = "---",
    null: Annotated[bool, typer.Option(
        "--null", "-0", help="Text format: end each output with NUL instead (for xargs -0).",
        rich_help_panel=IO)] = False,
    stream: Annotated[Optional[bool], typer.Option(
        "--stream/--no-stream", help="Print tokens as they come, in text format.",
        show_default="one prompt, on a terminal", rich_help_panel=IO)] = None,
    chat: Annotated[bool, typer.Option(
        "--chat", help="Use the model's chat template: the prompt is the user turn; prints the "
        "reply.", rich_help_panel=IO)] = False,
    no_truncate: Annotated[bool, typer.Option(
        "--no-truncate", help="Fail on a prompt longer than the context instead of cutting its "
        "start.", rich_help_panel=IO)] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", "-n", help="Tokens to generate.",
        show_default=str(generation.DEFAULT_MAX_NEW_TOKENS), rich_help_panel=SAMPLING)] = None,
    max_length: Annotated[Optional[int], typer.Option(
        "--max-length", help="Total tokens, prompt included (instead of -n).",
        rich_help_panel=SAMPLING)] = None,
    min_new_tokens: Annotated[Optional[int], typer.Option(
        "--min-new-tokens", help="Tokens to generate at least.", rich_help_panel=SAMPLING)] = None,
    temperature: Annotated[Optional[float], typer.Option(
        "--temperature", "-t", help="Sampling temperature.", show_default="the model's, else 1",
        rich_help_panel=SAMPLING)] = None,
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", help="Sample from the K most likely tokens.",
        show_default="the model's, else 50",
        rich_help_panel=SAMPLING)] = None,
    top_p: Annotated[Optional[float], typer.Option(
        "--top-p", help="Nucleus sampling.", show_default="the model's, else 0.95",
        rich_help_panel=SAMPLING)] = None,
    min_p: Annotated[Optional[float], typer.Option(
        "--min-p", help="Min-p sampling.", rich_help_panel=SAMPLING)] = None,
    typical_p: Annotated[Optional[float], typer.Option(
        "--typical-p", help="Typical sampling.", rich_help_panel=SAMPLING)] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(
        "--repetition-penalty", help="Penalty for tokens already present (1: none).",
        rich_help_panel=SAMPLING)] = None,
    no_repeat_ngram_size: Annotated[Optional[int], typer.Option(
        "--no-repeat-ngram-size", help="Never repeat an n-gram of this size.",
        rich_help_panel=SAMPLING)] = None,
    num_beams: Annotated[Optional[int], typer.Option(
        "--num-beams", help="Beam search with N beams.", rich_help_panel=SAMPLING)] = None,
    num_return_sequences: Annotated[int, typer.Option(
        "--num-return-sequences", "-N", help="Sequences per prompt.",
        rich_help_panel=SAMPLING)] = 1,
    greedy: Annotated[bool, typer.Option(
        "--greedy", help="Greedy decoding (no sampling).", rich_help_panel=SAMPLING)] = False,
    seed: SeedOpt = None,
    max_time: Annotated[Optional[float], typer.Option(
        "--max-time", help="Seconds per batch before generation stops.",
        rich_help_panel=SAMPLING)] = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        "--stop", help="Cut the output before this string (repeatable).",
        rich_help_panel=SAMPLING)] = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--option", "-o", help="Any other GenerationConfig field, KEY=VALUE (repeatable).",
        rich_help_panel=SAMPLING)] = None,
    batch_size: BatchSizeOpt = 8,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    quantize: QuantizeOpt = Quantize.auto,
    trust_remote_code: TrustRemoteCodeOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate text from prompts.

    Examples:

      nlgen generate "Once upon a time"

      nlgen generate -n 40 --greedy --stop "." "The meaning of life is"

      cat prompts.txt | nlgen generate --format jsonl | jq -r .completion

      nlgen generate --model builtin --chat "Write a haiku about the sea"
    """
    loading.check_device_spec(device)
    runtime.exit_fast_when_done()
    opts = generation.GenerationOptions(
        max_new_tokens=max_new_tokens, max_length=max_length, min_new_tokens=min_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        num_beams=num_beams, num_return_sequences=num_return_sequences, greedy=greedy,
        seed=seed, max_time=max_time, stop=tuple(stop or ()),
        extra=extra_options.parse_extra_options(option or ()), batch_size=batch_size, chat=chat,
        truncate=not no_truncate,
    )
    jsonl = fmt is GenerateFormat.jsonl
    if stream and jsonl:
        raise UsageError("--stream prints text as it comes; --format jsonl writes each record "
                         "when its prompt is done", hint="drop --stream, or use --format text")
    prompt_iter, single = _prompt_source(prompts, file, whole)
    if stream is None:
        stream = single and not jsonl and console.stdout_is_terminal()
    if stream and not opts.streamable:
        raise UsageError("--stream needs one sequence per prompt (no --num-beams or -N)")
    first = next(prompt_iter, None)
    if first is None:
        raise InputError("no prompts in the input: nothing to generate",
                         hint="blank lines are not prompts")

    lm = loading.load_model(model, device=device, dtype=dtype.value,
                            trust_remote_code=trust_remote_code, quantize=quantize.value)
    show_prompt = not completion_only and not chat
    stats = generation.GenerationStats()
    if stream and show_prompt:
        console.write(first.text)
    started = time.perf_counter()
    results = generation.generate(lm, chain([first], prompt_iter), opts, stats=stats,
                                  on_text=console.write if stream else None)
    several = not single or num_return_sequences > 1
    for count, result in enumerate(results):
        if jsonl:
            console.write_jsonl(_record(result, lm.name))
            continue
        body = result.text if show_prompt else result.completion
        if null:
            console.write(("" if stream else body) + "\0")
        elif stream:
            console.write("\n")
        else:
            console.write(("" if count == 0 or not several else separator + "\n") + body + "\n")
    if verbose or console.stderr_is_terminal():
        wall = time.perf_counter() - started
        weights = "" if lm.quantization == "none" else f", {lm.quantization} weights"
        console.summary(lm.name, lm.device, lm.dtype + weights,
                        f"{console.plural(stats.new_tokens, 'token')} in {stats.seconds:.1f} s, "
                        f"{stats.tokens_per_second:.1f} tokens/s "
                        f"({console.plural(stats.sequences, 'sequence')}, {wall:.1f} s in all)")


def _prompt_source(prompts: list[str] | None, file: str | None,
                   whole: bool) -> tuple[Iterator[inputs.Prompt], bool]:
    """Where prompts come from, and whether there is exactly one.

    Arguments win over piped stdin; the piped input is then left unread, and we say so, because
    silently ignoring it is the worse surprise. ``--file -`` reads stdin explicitly.
    """
    if prompts and file:
        raise UsageError("give prompts as arguments or with --file, not both")
    if prompts:
        if inputs.stdin_has_input():
            console.notice("prompts given as arguments; piped stdin is not read "
                           "(use --file - to read it)")
        if whole:
            text = "\n".join(prompts)
            return iter([inputs.Prompt(text)] if text.strip() else []), True
        # An argument is a prompt the user typed on purpose: a blank one is a mistake (perhaps
        # an empty shell variable), not something to skip and renumber the others around.
        for position, prompt in enumerate(prompts, 1):
            if not prompt.strip():
                raise UsageError(f"prompt argument {position} is empty",
                                 hint="check the shell variables that build the prompts")
        return iter([inputs.Prompt(p) for p in prompts]), len(prompts) == 1
    if file is None:
        if inputs.stdin_is_terminal():
            raise UsageError("no prompt given",
                             hint='nlgen generate "Once upon a time", or pipe prompts on stdin')
        file = inputs.STDIN
    elif file != inputs.STDIN:
        inputs.check_file(file)
    return inputs.iter_prompts([file], whole=whole), whole


def _record(result: generation.Generation, model_name: str) -> dict[str, Any]:
    record: dict[str, Any] = {"index": result.index}
    if result.line is not None:
        record["line"] = result.line
    record.update({
        "sequence": result.sequence, "prompt": result.prompt,
        "completion": result.completion, "text": result.text, "model": model_name,
        "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
    })
    return record
