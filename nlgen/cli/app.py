"""The root app: wiring only. Each command lives in its own module."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from typer import rich_utils
from typer.core import TyperOption

from nlgen import __version__
from nlgen.cli import finetune, generate, models, perplexity, score
from nlgen.cli.console import StdoutError, error, no_color, silence_stdout
from nlgen.cli.runtime import end_process, flush_stdout_quietly, is_main_process

_display_type_rich = TyperOption.display_type_rich


def _flag_type(self: TyperOption, ctx: typer.Context) -> str | None:
    """A flag takes no value: show no type for it (Typer 0.29 labels every flag ``<bool>``)."""
    if self.is_flag and self.metavar is None:
        return None
    return _display_type_rich(self, ctx)


TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]


def _usage_error(exc: Any) -> None:
    """Typer's usage errors (a bad choice, an unknown option) as one ``Error:`` line, like ours.

    Typer draws them in a multi-line box; every other nlgen failure is one line on stderr.
    """
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed: nothing to add
        return
    if not is_main_process():  # under a launcher every rank has the same bad option: say it once
        return
    ctx = getattr(exc, "ctx", None)
    hint = f"{ctx.command_path} --help lists the options" if ctx is not None else None
    error(" ".join(exc.format_message().split()), hint)


rich_utils.rich_format_error = _usage_error

_rich_console = rich_utils._get_rich_console


def _help_console(stderr: bool = False) -> Any:
    """Typer's console for --help, plain under NO_COLOR (rich alone drops the colours but keeps
    bold and dim), and a closed pipe a BrokenPipeError for main (exit 0; rich exits 1)."""
    rich_utils.COLOR_SYSTEM = None if no_color() else "auto"
    console = _rich_console(stderr=stderr)

    def broken_pipe() -> None:
        raise BrokenPipeError

    console.on_broken_pipe = broken_pipe
    return console


rich_utils._get_rich_console = _help_console

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
