"""What every command shares: start-up cost, --help, --version, the code's layout."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_nlgen

COMMANDS = ["generate", "perplexity", "finetune", "models", "serve"]


def test_help_imports_no_torch_for_any_command():
    code = ("import sys\nfrom nlgen.cli.app import app\n"
            f"for args in ([], *([c] for c in {COMMANDS!r})):\n"
            "    try:\n        app([*args, '--help'])\n    except SystemExit as e:\n"
            "        assert e.code == 0, (args, e.code)\n"
            "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'datasets', 'peft')\n"
            "         if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag):
    result = run_nlgen(flag)
    assert result.returncode == 0 and result.stdout.decode().startswith("nlgen ")


def test_shell_completion_is_offered(cli):
    result = cli("--help")
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_choices_and_defaults_cleanly(cli, command):
    out = cli(command, "--help").stdout
    # No stray " ." where rich swallowed a "[default: ...]" as markup.
    assert not re.search(r"\w \.(\s|$)", out)
    assert "<bool>" not in out  # a flag takes no value
    if command == "generate":
        assert "text|jsonl" in out and "default: (50)" in out
    if command == "finetune":
        assert "auto|fp32|bf16|fp16" in out and "default: (3)" in out


# Short functions (ARCHITECTURE.md). A function's length is its body's: a Typer command's
# signature is its table of options, one or two lines each. The layout itself (which module may
# import which) is tests/test_architecture.py's.
MAX_FUNCTION_LINES = 80


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body[1:] if (isinstance(node.body[0], ast.Expr) and isinstance(
        node.body[0].value, ast.Constant)) and len(node.body) > 1 else node.body
    return (node.end_lineno or node.lineno) - body[0].lineno + 1


def _sources() -> list[Path]:
    return sorted((ROOT / "nlgen").rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_function_sizes(path: Path):
    text = path.read_text(encoding="utf-8")
    long = [f"{node.name}: {_body_lines(node)} lines" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and _body_lines(node) > MAX_FUNCTION_LINES]
    assert not long


def test_core_never_imports_the_cli_libraries():
    """typer and rich live under nlgen/cli/ only: the core never prints."""
    for path in _sources():
        if "cli" in path.relative_to(ROOT / "nlgen").parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module}
        assert not names & {"typer", "rich", "click"}, path


def test_cli_choices_match_what_the_core_accepts():
    """The Enums of cli/options.py are the core's choices: a choice --help offers always works."""
    from nlgen.cli import options
    from nlgen.finetune.options import DEVICES, PRECISIONS
    from nlgen.models.devices import DTYPES

    assert tuple(e.value for e in options.Dtype) == DTYPES
    assert tuple(e.value for e in options.Precision) == PRECISIONS
    assert tuple(e.value for e in options.TrainDevice) == DEVICES
