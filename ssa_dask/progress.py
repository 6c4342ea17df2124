"""A progress bar for :func:`ssa_dask.sinkhorn.sinkhorn`, kept out of the solver as a callback.

::

    with SinkhornProgress(max_iter, tol=tol) as bar:
        result = sinkhorn(kernel, p, q, tol=tol, max_iter=max_iter, callback=[bar, checkpoint])

The bar is drawn on stderr (stdout stays clean for results), removed when the block ends, and
stopped however it ends (an exception, Ctrl-C), so the terminal is never left in a broken state.
"""

from __future__ import annotations

from types import TracebackType

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class SinkhornProgress:
    """Rich progress bar with the column-marginal error, used as a :func:`sinkhorn` callback.

    Parameters
    ----------
    max_iter : int
        The solve's ``max_iter`` (the bar's length).
    start_iteration : int
        The solve's ``start_iteration`` (a resumed run starts the bar there).
    tol : float, optional
        Shown beside the error when given.
    disable : bool
        Draw nothing (the callback still accepts calls), e.g. ``disable=not progress``.
    console : rich.console.Console, optional
        Where to draw (default: stderr).
    """

    def __init__(self, max_iter: int, *, start_iteration: int = 0, tol: float | None = None, disable: bool = False,
                 console: Console | None = None) -> None:
        self._target = f" (tol {tol:.1e})" if tol is not None else ""
        console = console or Console(stderr=True)
        # Off a terminal (a SLURM log, a pipe) a transient bar only leaves blank lines: draw nothing.
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=console, transient=True, disable=disable or not console.is_terminal)
        self._task = self._bar.add_task("Sinkhorn", total=max_iter, completed=start_iteration)

    def __enter__(self) -> SinkhornProgress:
        self._bar.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._bar.stop()

    def __call__(self, iteration: int, g: np.ndarray, error: float, eps: float) -> None:
        """Advance to ``iteration`` and show ``error``."""
        self._bar.update(self._task, completed=iteration, description=f"Sinkhorn  err {error:.2e}{self._target}")

    @property
    def is_running(self) -> bool:
        """Whether the bar is being drawn (between entering and leaving the ``with`` block)."""
        return self._bar.live.is_started

    @property
    def completed(self) -> int:
        """The iteration the bar shows."""
        return int(self._bar.tasks[0].completed)
