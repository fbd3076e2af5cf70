"""docs/failures.md, row by row: every failure a user can meet, its exit code and its words.

The table is the documentation; this test runs each row's example as written, in a folder that
holds the files the page names, so the page and the behaviour cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import CORPUS, ROOT

DOC = ROOT / "docs" / "failures.md"
ROW = re.compile(r"^\| (?P<command>[^|]+) \| (?P<case>.+?) \| `(?P<example>[^`]+)` \| "
                 r"(?P<code>\d+) \| `(?P<stderr>[^`]+)` \|$")


def rows() -> list[dict[str, str]]:
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- failures table", 1)[1]
    found = [m.groupdict() for line in table.splitlines() if (m := ROW.match(line))]
    assert len(found) >= 50, "the table was not parsed"
    return found


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The files docs/failures.md names."""
    base = tmp_path_factory.mktemp("failures")
    shutil.copytree(tiny_model, base / "model")
    shutil.copytree(tiny_model, base / "damaged")
    weights = base / "damaged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (base / "notes.txt").write_text(CORPUS.read_text(encoding="utf-8"), encoding="utf-8")
    (base / "short.txt").write_text("a", encoding="utf-8")
    (base / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (base / "blank.txt").write_text("\n  \n\n", encoding="utf-8")
    (base / "empty.txt").write_bytes(b"")
    (base / "folder").mkdir()
    (base / "folder" / "image.png").write_bytes(b"\x89PNG")
    (base / "notes.jsonl").write_text('{"body": "a"}\n', encoding="utf-8")
    (base / "records.jsonl").write_text(
        '{"prompt": "a", "completion": " b"}\n{"prompt": "a"}\nnot json\n'
        '{"prompt": "a", "choices": "x"}\n{"prompt": "a", "choices": [" b"], "label": 3}\n'
        '{"prompt": "a", "completion": ""}\n', encoding="utf-8")
    (base / "broken.csv").write_text('text,label\n"a, b",1\nc,d,e\n', encoding="utf-8")
    (base / "random.gguf").write_bytes(b"not a gguf file")
    (base / "models").mkdir()
    (base / "done").mkdir()
    (base / "done" / "nlgen_run.json").write_text("{}", encoding="utf-8")
    answer = '{"index": 0, "sequence": 0, "completion": " b"}\n'
    (base / "answers.jsonl").write_text(answer, encoding="utf-8")
    (base / "answers.jsonl.job.json").write_text(json.dumps(
        {"job_id": "0123456789ab", "command": "generate", "input": {"sha256": "0" * 64,
                                                                    "bytes": 1},
         "model": "model", "options": {}}), encoding="utf-8")
    (base / "old.jsonl").write_text(answer, encoding="utf-8")
    request = {"custom_id": "long", "method": "POST", "url": "/v1/completions",
               "body": {"prompt": "a", "max_tokens": 9000}}
    (base / "long.jsonl").write_text(json.dumps(request) + "\n", encoding="utf-8")
    (base / "twice.jsonl").write_text(2 * (json.dumps({**request, "custom_id": "a"}) + "\n"),
                                      encoding="utf-8")
    return base


def parse(example: str) -> tuple[dict[str, str], list[str], str | None]:
    """``VAR=x nlgen ARGS < FILE`` -> (environment, ARGS, FILE)."""
    words = shlex.split(example)
    env = {}
    while "=" in words[0] and words[0] != "nlgen":
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    assert words.pop(0) == "nlgen"
    stdin = None
    if "<" in words:
        at = words.index("<")
        stdin, words = words[at + 1], words[:at]
    return env, words, stdin


@pytest.mark.parametrize("row", rows(), ids=lambda r: f"{r['command']}: {r['case']}")
def test_failure_table_row(row, folder, cli, monkeypatch):
    monkeypatch.chdir(folder)
    # No terminal here: the "no input on a terminal" row needs stdin to look like one.
    monkeypatch.setattr("nlgen.inputs.stdin_is_terminal", lambda: row["case"].endswith(
        "on a terminal"))
    env, args, stdin = parse(row["example"])
    monkeypatch.setattr("nlgen.inputs.stdin_has_input", lambda: stdin is not None)
    before = sorted(p.name for p in folder.iterdir())
    data = (folder / stdin).read_bytes() if stdin else None
    result = cli(*args, input=data, env=env)
    stderr = result.stderr
    assert result.exit_code == int(row["code"]), stderr
    assert stderr.startswith(row["stderr"]), stderr
    # One line per failure; commands that go on past a bad input end with a count line.
    assert stderr.count("Error:") == 1 or row["command"] in ("perplexity", "score"), stderr
    assert "Traceback" not in stderr and "bug in nlgen" not in stderr
    assert sorted(p.name for p in folder.iterdir()) == before  # a failure writes nothing
