"""The Typer application that every ``ssa_dask.cli`` module registers its commands on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="ssa-dask",
    help="SSA: align single-cell RNA-seq cells to spatial transcriptomics spots, out of core on Dask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
