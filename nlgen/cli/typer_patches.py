"""Every change nlgen makes to Typer's behaviour, in one place, applied once by cli/app.py.

Typer offers no hook for these three, so they replace Typer functions (0.26 to 0.29):

- ``TyperOption.display_type_rich``: a flag takes no value, so --help shows no ``<bool>`` type;
- ``rich_utils.rich_format_error``: a usage error (bad choice, unknown option) is one
  ``Error:`` line on stderr like every other nlgen failure, not a multi-line box;
- ``rich_utils._get_rich_console``: --help is plain under NO_COLOR (rich alone drops colours but
  keeps bold and dim), and a closed pipe exits 0.

tests/test_typer_patches.py checks that each function still exists with the signature replaced
here, and that each change still shows: when Typer changes under them, that test fails first.
"""

from __future__ import annotations

from typing import Any

import typer
from typer import rich_utils
from typer.core import TyperOption

from nlgen.cli.console import error, no_color
from nlgen.cli.runtime import is_main_process

_display_type_rich = TyperOption.display_type_rich


def _flag_type(self: TyperOption, ctx: typer.Context) -> str | None:
    """A flag takes no value: show no type for it (Typer 0.29 labels every flag ``<bool>``)."""
    if self.is_flag and self.metavar is None:
        return None
    return _display_type_rich(self, ctx)


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


def apply() -> None:
    """Install the three replacements (idempotent)."""
    TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]
    rich_utils.rich_format_error = _usage_error
    rich_utils._get_rich_console = _help_console
