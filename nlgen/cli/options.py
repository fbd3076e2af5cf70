"""Options shared by several commands, declared once as Annotated aliases."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

MODEL_HELP = (
    "Model: a Hub id, a local directory (save_pretrained / nlgen finetune), a .gguf file, or "
    "'builtin' (SmolLM2-135M-Instruct, shipped offline). Default: gpt2, falling back to builtin "
    "when gpt2 cannot be loaded."
)

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", envvar="NLGEN_MODEL", help=MODEL_HELP, show_default=False),
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="auto (GPU when there is one), cpu, cuda, cuda:N or mps."),
]
DtypeOpt = Annotated[
    str,
    typer.Option("--dtype", help="auto, float32, bfloat16 or float16 (auto: see README)."),
]
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
