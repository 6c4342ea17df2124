"""Command-line interface: ``ssa-dask`` (align, ingest, demo, simulate, benchmark, synth)."""

import signal
from types import FrameType

from ssa_dask.cli import core, evaluate, scale  # noqa: F401  (register their commands)
from ssa_dask.cli._app import app


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM (SLURM walltime, ``scancel``, a pod stop) into the same clean-up path as Ctrl-C."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    """Run the ``ssa-dask`` command-line interface.

    SIGTERM is handled like SIGINT (Ctrl-C): ``finally`` blocks run, so worker jobs are cancelled
    and scratch is removed when SLURM's walltime, ``scancel`` or a pod stop ends the run.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    app()
