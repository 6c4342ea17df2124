"""The Typer application that every ``ssa_dask.cli`` module registers its commands on."""

from __future__ import annotations

import typer
from rich.console import Console

#: Where commands print messages and errors (stderr, so results on stdout stay clean).
console = Console(stderr=True)

app = typer.Typer(
    name="ssa-dask",
    help="SSA: align single-cell RNA-seq cells to spatial transcriptomics spots, out of core on Dask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` without a traceback and exit with ``code``."""
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)
