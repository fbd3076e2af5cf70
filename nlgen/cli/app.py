"""The root app: wiring only. Each command lives in its own module."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from nlgen import __version__
from nlgen.cli import finetune, generate, models, perplexity, score, serve, typer_patches
from nlgen.cli.console import StdoutError, error, silence_stdout
from nlgen.cli.runtime import end_process, flush_stdout_quietly

typer_patches.apply()

app = typer.Typer(
    name="nlgen",
    help="Hugging Face language models in a terminal and in shell pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # errors are mapped to one line in cli/runtime.py
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
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
        typer.Option("--version", "-V", callback=_version, is_eager=True,
                     help="Show the version."),
    ] = None,
) -> None:
    """Generate text, fine-tune and measure perplexity with Hugging Face models.

    Exit codes: 0 success, 1 runtime failure, 2 usage error, 130 interrupted.
    """


app.command("generate")(generate.generate)
app.command("models")(models.models)
app.command("perplexity")(perplexity.perplexity)
app.command("finetune")(finetune.finetune)
app.command("score")(score.score)
app.command("serve")(serve.serve)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as exc:
        end_process(exc.code)  # skips the interpreter's teardown where it is safe
        raise
    except BrokenPipeError:  # --help | head -n 1 (a command's own output is mapped by guard)
        silence_stdout()
        raise SystemExit(0) from None
    except OSError as exc:  # --help or --version into a full disk: outside any command's guard
        silence_stdout()
        error(StdoutError(exc).message)
        raise SystemExit(1) from None
    finally:
        # A reader that closed the pipe must not turn the exit-time flush into a traceback.
        flush_stdout_quietly()
