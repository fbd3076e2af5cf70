"""nlgen/cli/typer_patches.py: the Typer functions it replaces are still there, and each change
still shows. When a Typer release moves or renames them, these tests fail before users notice."""

from __future__ import annotations

import inspect

from typer import rich_utils
from typer.core import TyperOption
from typer.testing import CliRunner

from nlgen.cli import typer_patches
from nlgen.cli.app import app


def test_the_replaced_functions_still_exist_with_their_signatures():
    assert list(inspect.signature(typer_patches._display_type_rich).parameters) == ["self", "ctx"]
    assert list(inspect.signature(typer_patches._rich_console).parameters) == ["stderr"]
    # rich_format_error(self: click.ClickException) in Typer: one positional parameter.
    assert len(inspect.signature(rich_utils.rich_format_error).parameters) == 1


def test_the_replacements_are_installed():
    assert TyperOption.display_type_rich is typer_patches._flag_type
    assert rich_utils.rich_format_error is typer_patches._usage_error
    assert rich_utils._get_rich_console is typer_patches._help_console


def test_a_usage_error_is_one_error_line():
    result = CliRunner().invoke(app, ["generate", "--nope", "x"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("Error: No such option: --nope")
    assert not any(c in result.stderr for c in "╭╰│")  # no box


def test_flags_show_no_type_in_help(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    result = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    greedy = next(line for line in result.stdout.splitlines() if "--greedy" in line)
    assert "BOOLEAN" not in greedy.upper() and "<bool>" not in greedy
    assert "\x1b[" not in result.stdout  # plain under NO_COLOR: no bold, no dim
