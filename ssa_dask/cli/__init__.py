"""Command-line interface: ``ssa-dask`` (align, ingest, demo, simulate, benchmark, synth)."""

from ssa_dask.cli import core, evaluate, scale  # noqa: F401  (register their commands)
from ssa_dask.cli._app import app


def main() -> None:
    """Run the ``ssa-dask`` command-line interface."""
    app()
