"""Options shared by several commands, declared once as Annotated aliases; choices as Enums.

Typer validates an Enum itself (exit 2, listing the choices) and shows the choices and the
default in ``--help``, so no command checks these values by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, Optional, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


class Dtype(str, Enum):
    """Weights' dtype; auto: see the README (bfloat16 on a CPU with native bfloat16, ...)."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantize(str, Enum):
    """Weight-only quantization for generating on the CPU (nlgen.models.quantized)."""

    auto = "auto"
    none = "none"
    int4 = "int4"
    int8 = "int8"


class Engine(str, Enum):
    """generate --engine: auto, nlgen's loop where it runs, else transformers'."""

    auto = "auto"
    nlgen = "nlgen"
    transformers = "transformers"


class Precision(str, Enum):
    """Mixed precision of a training run (the weights stay float32)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class TrainDevice(str, Enum):
    """finetune's --device: which GPU is chosen by CUDA_VISIBLE_DEVICES or the launcher."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class GenerateFormat(str, Enum):
    text = "text"
    jsonl = "jsonl"


class InputFormat(str, Enum):
    """generate --input-format: auto is jsonl for a *.jsonl file, text otherwise."""

    auto = "auto"
    text = "text"
    jsonl = "jsonl"


class PerplexityFormat(str, Enum):
    auto = "auto"
    table = "table"
    json = "json"
    jsonl = "jsonl"


class ScoreFormat(str, Enum):
    auto = "auto"
    table = "table"
    json = "json"
    jsonl = "jsonl"


class ModelsFormat(str, Enum):
    auto = "auto"
    table = "table"
    text = "text"
    jsonl = "jsonl"


MODEL_HELP = (
    "Model: a Hub id, a local directory (save_pretrained / nlgen finetune), a .gguf file, or "
    "'builtin' (SmolLM2-135M-Instruct, shipped offline). Default: gpt2, falling back to builtin "
    "when gpt2 cannot be loaded."
)

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", envvar="NLGEN_MODEL", help=MODEL_HELP, show_default=False),
]
ReferenceOpt = Annotated[
    Optional[str],
    typer.Option("--reference", help="Compare with this model (same forms as --model), or "
                 "'base': the base of the LoRA adapter directory given as --model, with one copy "
                 "in memory (the adapter switched off).", show_default=False),
]
# Free-form (cuda:N), so validated by the core's pattern rather than by an Enum.
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="auto (GPU when there is one), cpu, cuda, cuda:N or mps."),
]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Weights' dtype (auto: see README).")]
QuantizeOpt = Annotated[Quantize, typer.Option(
    "--quantize", help="Weight-only quantization on the CPU: auto runs a GGUF model's own 4-bit "
    "weights (bfloat16 arithmetic); int4 / int8 quantize any model (lossy: see README).")]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Allow a Hub model to run its own Python code."),
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", "-b", help="Sequences per forward pass.")
]
SeedOpt = Annotated[
    Optional[int], typer.Option("--seed", help="Random seed, for reproducible results.")
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="More notices on stderr, and a closing summary.")
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No notices on stderr; errors only.")
]

JOB = "Batch jobs"
OutputOpt = Annotated[
    Optional[str],
    typer.Option("--output", metavar="FILE", help="Write the jsonl records to FILE as they are "
                 "done (stdout stays empty); a crash loses only the work in flight: see --resume.",
                 rich_help_panel=JOB, show_default=False),
]
ResumeOpt = Annotated[
    bool,
    typer.Option("--resume", help="Continue the job whose --output FILE exists: skip the records "
                 "in it, do the rest (same input and options).", rich_help_panel=JOB),
]


@dataclasses.dataclass(frozen=True)
class ScoringJob:
    """The options ``perplexity`` and ``score`` share: the job's output, the model (and its
    reference), where it runs, and what it says. Declared once here; :func:`scoring_job` puts
    them on a command."""

    output: OutputOpt = None
    resume: ResumeOpt = False
    batch_size: BatchSizeOpt = 8
    model: ModelOpt = None
    reference: ReferenceOpt = None
    device: DeviceOpt = "auto"
    dtype: DtypeOpt = Dtype.auto
    trust_remote_code: TrustRemoteCodeOpt = False
    verbose: VerboseOpt = False
    quiet: QuietOpt = False


def scoring_job(command: F) -> F:
    """``command`` with :class:`ScoringJob`'s options after its own, handed to it as one
    ``job`` argument (its last parameter).

    Typer reads a command's options from its signature, so the wrapper shows the command's own
    parameters and then ScoringJob's fields, with their types and defaults; called with all of
    them as keywords (as Typer calls it), it gathers ScoringJob's into ``job``.
    """
    hints = typing.get_type_hints(ScoringJob, include_extras=True)
    shared = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=f.default, annotation=hints[f.name])
              for f in dataclasses.fields(ScoringJob)]
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.name != "job"]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        job = ScoringJob(**{p.name: kwargs.pop(p.name, p.default) for p in shared})
        return command(**kwargs, job=job)

    wrapper.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + shared}
    return wrapper  # type: ignore[return-value]
