"""Command-line interface: ``ssa-dask`` (align, ingest, demo, simulate, benchmark, synth)."""

import signal
import sys
from types import FrameType

from ssa_dask.cli import core, evaluate, scale  # noqa: F401  (register their commands)
from ssa_dask.cli._app import app, console

#: The signal that stopped the run, for the one-line message.
_stopped_by: list[str] = []


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM (SLURM walltime, ``scancel``, a pod stop) and SIGINT into KeyboardInterrupt, once."""
    _stopped_by.append(signal.Signals(signum).name)
    if len(_stopped_by) == 1:
        raise KeyboardInterrupt(_stopped_by[0])


def main() -> None:
    """Run the ``ssa-dask`` command-line interface.

    SIGTERM is handled like SIGINT (Ctrl-C): ``finally`` blocks run, so worker jobs are cancelled
    and scratch is removed when SLURM's walltime, ``scancel`` or a pod stop ends the run, and one
    line says so instead of a traceback (exit code 130).
    """
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except SystemExit as exc:
        if exc.code == 130 or _stopped_by:
            reason = _stopped_by[0] if _stopped_by else "SIGINT"
            console.print(f"[bold red]interrupted[/] by {reason}: the run stopped; its scratch files and worker jobs "
                          "were cleaned up and no output was written", soft_wrap=True)
            sys.exit(130)
        raise
