"""``nlgen generate``: prompts in, continuations out."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Annotated, Any, Optional

import typer

from nlgen import inputs
from nlgen.cli import console, jobs, runtime
from nlgen.cli.options import (
    JOB,
    BatchSizeOpt,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    Engine,
    GenerateFormat,
    InputFormat,
    ModelOpt,
    OutputOpt,
    Quantize,
    QuantizeOpt,
    QuietOpt,
    ResumeOpt,
    SeedOpt,
    TrustRemoteCodeOpt,
    VerboseOpt,
)
from nlgen.cli.runtime import guard
from nlgen.engine import extra_options, generation, lean_weights
from nlgen.errors import EXIT_FAILURE, InputError, UsageError
from nlgen.jobs import batchjob, distributed, jobfile, parallel
from nlgen.models import devices, loading

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
    input_format: Annotated[InputFormat, typer.Option(
        "--input-format", help="text: one prompt a line; jsonl: one request a line (nlgen "
        "prompt records or OpenAI batch requests, see README); auto: jsonl for *.jsonl.",
        rich_help_panel=IO)] = InputFormat.auto,
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
    logprobs: Annotated[Optional[int], typer.Option(
        "--logprobs", min=0, help="jsonl records only (--format jsonl, --output, OpenAI batch "
        "files): each generated token's log-prob and its K most likely alternatives, in "
        "OpenAI's shape (0: the chosen token's only). The "
        "model's own log-probs (raw logits), before temperature, top-k/p and penalties.",
        show_default=False, rich_help_panel=IO)] = None,
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
    output: OutputOpt = None,
    resume: ResumeOpt = False,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="Answer a bad record of a .jsonl input with an error record and go "
        "on (exit 1 at the end), instead of stopping before any generation.",
        rich_help_panel=JOB)] = False,
    batch_size: BatchSizeOpt = 8,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    quantize: QuantizeOpt = Quantize.auto,
    engine: Annotated[Engine, typer.Option(
        "--engine", help="auto: nlgen's loop (a lean GPT-2 / Llama / Qwen2 forward, each sequence "
        "in its own cache slot; the same tokens as generate()) where it can run the model "
        "and options, else "
        "transformers' generate(); nlgen: that loop, or an error saying why not; "
        "transformers: generate() always. -v says which ran.")] = Engine.auto,
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

      nlgen generate -f requests.jsonl --output answers.jsonl   # then --resume after a crash

      torchrun --nproc_per_node 4 -m nlgen generate -f prompts.txt --output out.jsonl
    """
    devices.check_device_spec(device)
    runtime.exit_fast_when_done()
    opts = generation.GenerationOptions(
        max_new_tokens=max_new_tokens, max_length=max_length, min_new_tokens=min_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        num_beams=num_beams, num_return_sequences=num_return_sequences, greedy=greedy,
        seed=seed, max_time=max_time, stop=tuple(stop or ()),
        extra=extra_options.parse_extra_options(option or ()), batch_size=batch_size, chat=chat,
        truncate=not no_truncate, logprobs=logprobs, engine=engine.value,
    )
    jsonl = fmt is GenerateFormat.jsonl
    if stream and jsonl:
        raise UsageError("--stream prints text as it comes; --format jsonl writes each record "
                         "when its prompt is done", hint="drop --stream, or use --format text")
    if stream and (output or distributed.is_distributed()):
        raise UsageError("--stream prints one process's text to stdout as it comes",
                         hint="drop --stream with --output or several processes")
    parallel.check_shareable([_source(prompts, file)])
    asked = opts
    with jobs.launched(device) as rank_device:
        opts = parallel.shared_seed(opts)
        job = parallel.on_every_rank(lambda: _job(prompts, file, whole, input_format, opts,
                                                  skip_bad, count=output is not None))
        if logprobs is not None and not jsonl and output is None and job.fmt != batchjob.OPENAI:
            raise UsageError("--logprobs needs --format jsonl (text output has no place for "
                             "them)", hint="add --format jsonl")
        if stream is None:
            stream = (job.single and not jsonl and output is None
                      and not distributed.is_distributed() and console.stdout_is_terminal())
        if stream and not opts.streamable:
            raise UsageError("--stream needs one sequence per prompt (no --num-beams or -N)")
        view = _View(job.fmt, jsonl=jsonl, show_prompt=not completion_only and not chat,
                     stream=stream, null=null, separator=separator,
                     several=not job.single or num_return_sequences > 1)

        def load() -> loading.LoadedModel:
            view.lm = loading.load_model(model, device=rank_device, dtype=dtype.value,
                                         trust_remote_code=trust_remote_code,
                                         quantize=quantize.value,
                                         lean_reader=lean_weights.read)
            runtime.use_spare_threads(view.lm)
            if stream and view.show_prompt:
                console.write(job.first)
            return view.lm

        stats = generation.GenerationStats()
        started = time.perf_counter()
        identity = _identity(prompts, file, job.fmt, asked, whole=whole, model=model,
                             device=device, dtype=dtype, quantize=quantize)
        with parallel.JobOutput(output, batchjob.KEY_FIELDS[job.fmt], resume,
                                identity) as out:
            view.writer, view.job_id = out.writer, out.job_id
            requests = (r for r in job.requests
                        if not batchjob.is_done(job.fmt, r, out.done, out.job_id))
            local = parallel.generate_requests(load, requests, opts, stats=stats,
                                               uniform=job.fmt == batchjob.TEXT,
                                               on_text=console.write if stream else None,
                                               skip_bad=skip_bad)
            results = parallel.Gathered(local, parallel.stats_totals(stats))
            with jobs.JobProgress("generating", job.total, enabled=output is not None,
                                  done=batchjob.answered(job.fmt, out.done)) as bar:
                for result in results:
                    view.show(result)
                    bar.advance(1, result.new_tokens)
    if distributed.is_main_process():
        _finish(view, parallel.stats_from(results.totals), time.perf_counter() - started,
                verbose)


@dataclass
class _Job:
    """What a generate run works through: its requests, and what the output depends on."""

    fmt: str  # batchjob.TEXT, PROMPTS or OPENAI
    requests: Iterator[batchjob.Request]
    single: bool  # exactly one prompt (no separators between outputs; streaming by default)
    total: int | None = None  # requests in the input, when known (for the progress bar)
    first: str = ""  # the first prompt's text (printed first when streaming)


def _job(prompts: list[str] | None, file: str | None, whole: bool, input_format: InputFormat,
         opts: generation.GenerationOptions, skip_bad: bool, count: bool) -> _Job:
    """The requests from arguments, a text file, a .jsonl request file, or stdin.

    A request file is checked whole before anything is generated (bad records: exit 2,
    unless --skip-bad). Nothing here loads a model.
    """
    source = _source(prompts, file)
    records = input_format is InputFormat.jsonl or (
        input_format is InputFormat.auto and source is not None and inputs.is_jsonl(source))
    if records and (prompts or source is None):
        raise UsageError("--input-format jsonl reads a file or stdin, not prompt arguments")
    if records and whole:
        raise UsageError("--whole reads text; a .jsonl file holds one request a line",
                         hint="drop --whole, or pass --input-format text")
    if records:
        assert source is not None
        if source != inputs.STDIN:
            inputs.check_file(source)
        request_file = batchjob.load_requests(source, opts, skip_bad=skip_bad)
        return _Job(request_file.fmt, request_file.requests(), request_file.count == 1,
                    request_file.count)
    prompt_iter, single = _prompt_source(prompts, file, whole)
    first = next(prompt_iter, None)
    if first is None:
        raise InputError("no prompts in the input: nothing to generate",
                         hint="blank lines are not prompts")
    total = len(prompts) if prompts else None
    if count and total is None and file not in (None, inputs.STDIN):
        total = sum(1 for _ in inputs.iter_prompts([file], whole=whole))
    requests = batchjob.text_requests(chain([first], prompt_iter), opts)
    return _Job(batchjob.TEXT, requests, single, total, first.text)


def _identity(prompts: list[str] | None, file: str | None, fmt: str,
              opts: generation.GenerationOptions, *, whole: bool, model: str | None,
              device: str, dtype: Dtype, quantize: Quantize) -> jobfile.JobIdentity:
    """What defines this job for --resume: its input, its model, and every option that changes
    its records (dtype, quantization and device change numbers).

    Left out: --skip-bad (a job stopped by a bad record resumes with it), the batch size and
    --engine. Neither changes the model's arithmetic: in float32 the engines give the same
    tokens (tests/test_engine_equivalence.py), and in bfloat16 a near tie may round either way,
    as it already may between a prompt alone and the same prompt in a padded batch (a job mixes
    both whatever its batch size). Keeping them out also lets a job resume with another.
    """
    options = {k: v for k, v in dataclasses.asdict(opts).items()
               if k not in ("batch_size", "engine")}
    options.update(input_format=fmt, whole=whole, device=device, dtype=dtype.value,
                   quantize=quantize.value)
    if prompts:
        return jobfile.JobIdentity("generate", model, options, arguments=tuple(prompts))
    source = _source(prompts, file)
    return jobfile.JobIdentity("generate", model, options, files=(source or inputs.STDIN,))


def _source(prompts: list[str] | None, file: str | None) -> str | None:
    """The input file (``-`` for stdin) that prompts are read from; None for arguments."""
    piped = not prompts and file is None and not inputs.stdin_is_terminal()
    return inputs.STDIN if piped else file


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


@dataclass
class _View:
    """Rank 0's side: each answered request to --output, or to stdout as jsonl or text."""

    fmt: str
    jsonl: bool
    show_prompt: bool
    stream: bool
    null: bool
    separator: str
    several: bool
    lm: Any = None  # set once this rank's model is loaded
    writer: Any = None  # the --output file's ResumableWriter
    job_id: str = ""  # names the job's OpenAI-format lines
    shown: int = 0  # sequences printed so far (text format)
    bad: int = 0  # bad records answered with an error record (--skip-bad)

    def show(self, result: batchjob.Result) -> None:
        request = result.request
        self.bad += not request.ok
        records = batchjob.records(self.fmt, result, self.lm.name, self.job_id)
        if self.writer is not None:
            for record in records:
                self.writer.write(record)
        elif self.jsonl or self.fmt == batchjob.OPENAI:
            for record in records:
                console.write_jsonl(record)
        elif not request.ok:
            console.error(str(request.error))
        else:
            for gen in result.generations:
                self._text(gen)

    def _text(self, result: generation.Generation) -> None:
        body = result.text if self.show_prompt else result.completion
        if self.null:
            console.write(("" if self.stream else body) + "\0")
        elif self.stream:
            console.write("\n")
        else:
            gap = "" if self.shown == 0 or not self.several else self.separator + "\n"
            console.write(gap + body + "\n")
        self.shown += 1


def _finish(view: _View, stats: generation.GenerationStats, wall: float, verbose: bool) -> None:
    """The closing summary (verbose, or on a terminal), and exit 1 after bad records."""
    if view.lm is not None and (verbose or console.stderr_is_terminal()):
        lm = view.lm
        # Several processes generate at once: the time of one is their summed time's share.
        seconds = stats.seconds / distributed.world_size()
        rate = stats.new_tokens / seconds if seconds > 0 else 0.0
        weights = "" if lm.quantization == "none" else f", {lm.quantization} weights"
        console.summary(lm.name, lm.device, lm.dtype + weights,
                        f"{console.plural(stats.new_tokens, 'token')} in {seconds:.1f} s, "
                        f"{rate:.1f} tokens/s ({console.plural(stats.sequences, 'sequence')}, "
                        f"{wall:.1f} s in all{jobs.processes()})")
    if view.bad:
        console.error(f"{console.plural(view.bad, 'bad record')} answered with an error record")
        raise typer.Exit(EXIT_FAILURE)
