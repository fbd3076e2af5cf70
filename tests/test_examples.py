"""Every shell example in examples/ runs as documented (tiny model by default, builtin if slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

EXAMPLES = ROOT / "examples"
BUILTIN_ONLY = {"05_chat.sh"}  # needs a model with a chat template
SLOW = {"06_best_of_n.sh", "07_finetune_and_compare.sh"}


def run_example(name: str, model: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    if model:
        env["NLGEN_MODEL"] = model
    return subprocess.run(["bash", str(EXAMPLES / name)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def scripts() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.sh"))


TINY = [n for n in scripts() if n not in BUILTIN_ONLY | SLOW]
BUILTIN = [n for n in scripts() if n in BUILTIN_ONLY | SLOW]


def test_every_example_is_run_and_documented():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(scripts()) >= 5
    assert (BUILTIN_ONLY | SLOW) <= set(scripts()), "a listed example no longer exists"
    for name in scripts():
        assert os.access(EXAMPLES / name, os.X_OK), f"{name} is not executable"
        assert (name in TINY) != (name in BUILTIN), f"{name} must run exactly once"
        assert f"`{name}`" in readme, f"{name} is not in the README's examples table"


@pytest.mark.parametrize("name", TINY)
def test_example_on_the_tiny_model(name, tiny_model):
    if "jq" in (EXAMPLES / name).read_text() and not shutil.which("jq"):
        pytest.skip("jq is not installed")
    result = run_example(name, str(tiny_model))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "an example prints its results"
    assert "Traceback" not in result.stderr
    if name == "03_first_result_only.sh":
        [line] = result.stdout.splitlines()
        assert json.loads(line)["index"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN)
def test_example_on_the_builtin_model(name):
    result = run_example(name, "builtin")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
