"""Command-line interface: ``ssa-dask``."""

from ssa_dask.cli._app import app


def main() -> None:
    """Run the ``ssa-dask`` command-line interface."""
    app()
