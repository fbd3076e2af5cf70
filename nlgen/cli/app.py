"""The root app: wiring only. Each command lives in its own module."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from nlgen import __version__
from nlgen.cli import finetune, generate, models, perplexity
from nlgen.cli.runtime import flush_stdout_quietly

app = typer.Typer(
    name="nlgen",
    help="Hugging Face language models in a terminal and in shell pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # errors are mapped to one line in cli/runtime.py
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"nlgen {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = None,
) -> None:
    """Generate text, fine-tune and measure perplexity with Hugging Face models.

    Exit codes: 0 success, 1 runtime failure, 2 usage error, 130 interrupted.
    """


app.command("generate")(generate.generate)
app.command("models")(models.models)
app.command("perplexity")(perplexity.perplexity)
app.command("finetune")(finetune.finetune)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    finally:
        # A reader that closed the pipe must not turn the exit-time flush into a traceback.
        flush_stdout_quietly()
