"""The Typer application that every ``ssa_dask.cli`` module registers its commands on."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup, TyperOption

#: Where commands print messages and errors (stderr, so results on stdout stay clean).
console = Console(stderr=True)


def _untyped_flags(params: list[Any]) -> list[Any]:
    """Give flags an empty metavar: typer's rich help otherwise prints ``<bool>`` after options
    that take no value (``--overwrite <bool>``, ``--help <bool>``)."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


class _App(typer.Typer):
    """A Typer app whose commands show flags without a value type in their help."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _App(
    name="ssa-dask",
    help="SSA: align single-cell RNA-seq cells to spatial transcriptomics spots, out of core on Dask.",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        from ssa_dask import __version__

        typer.echo(f"ssa-dask {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_print_version,
                                 is_eager=True),
) -> None:
    """SSA: align single-cell RNA-seq cells to spatial transcriptomics spots, out of core on Dask."""


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` without a traceback and exit with ``code``."""
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)
