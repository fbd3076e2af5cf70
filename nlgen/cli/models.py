"""``nlgen models``: what can be loaded without a network."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from nlgen.cli import console
from nlgen.cli.options import ModelsFormat
from nlgen.cli.runtime import guard
from nlgen.models import catalog


@guard
def models(
    fmt: Annotated[ModelsFormat, typer.Option(
        "--format", help="auto: a table on a terminal, else text (tab-separated); jsonl.")]
    = ModelsFormat.auto,
) -> None:
    """List the built-in model and the models in the local caches.

    Examples:

      nlgen models

      nlgen models --format jsonl | jq -r .name
    """
    entries = catalog.list_models()
    if fmt is ModelsFormat.auto:
        fmt = ModelsFormat.table if console.stdout_is_terminal() else ModelsFormat.text
    if fmt is ModelsFormat.jsonl:
        for entry in entries:
            console.write_jsonl(entry.as_dict())
    elif fmt is ModelsFormat.text:
        for entry in entries:
            console.write(f"{entry.name}\t{entry.kind}\t{entry.size_human}\t{entry.location}\n")
    else:
        table = Table("model", "kind", "size", "where", "note")
        for entry in entries:
            table.add_row(entry.name, entry.kind, entry.size_human, entry.location, entry.note)
        console.stdout_console().print(table)
