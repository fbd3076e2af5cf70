"""``nlgen models``: what can be loaded without a network."""

from __future__ import annotations

from typing import Annotated

import typer

from nlgen.cli.runtime import guard
from nlgen.errors import UsageError


@guard
def models(
    fmt: Annotated[str, typer.Option("--format", help="table (on a terminal) , text or jsonl.")]
    = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", hidden=True)] = False,
) -> None:
    """List the built-in model and the models in the local caches.

    Examples:

      nlgen models

      nlgen models --format jsonl | jq -r .name
    """
    from nlgen import catalog, output

    if fmt not in ("auto", "table", "text", "jsonl"):
        raise UsageError(f"invalid --format {fmt!r}", hint="use table, text or jsonl")
    entries = catalog.list_models()
    if fmt == "auto":
        fmt = "table" if output.stdout_is_terminal() else "text"
    if fmt == "jsonl":
        for entry in entries:
            output.write_jsonl(entry.as_dict())
    elif fmt == "text":
        for entry in entries:
            output.write(f"{entry.name}\t{entry.kind}\t{entry.size_human}\t{entry.location}\n")
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("model", "kind", "size", "where", "note")
        for entry in entries:
            table.add_row(entry.name, entry.kind, entry.size_human, entry.location, entry.note)
        Console().print(table)
