"""The Typer layer: thin, one module per command. Imports no torch or transformers."""
