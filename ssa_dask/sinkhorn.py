"""Entropic optimal transport by Sinkhorn iterations over a :class:`~ssa_dask.kernel.Kernel`.

Solves ``min_T <T, D> - eps H(T)`` subject to ``T 1 = p``, ``T^T 1 = q``, whose solution is
``T = diag(a) K diag(b)`` with ``K = exp(-D/eps)``.  Each iteration is the classical pair of
updates ``a = p / (K b)``, ``b = q / (K^T a)``, fused into one pass over the kernel blocks:

    c = b * K^T (p / (K b))          (column marginal of the plan after the row update)
    g <- g + eps * log(q / c)        (equivalently b <- q / (K^T a)),

with ``b = exp(g / eps)``.  The rows of the plan match ``p`` after every iteration; iterations
stop when the column marginal error ``||c - q||_1`` falls below ``tol``.  The same loop runs in the
kernel domain and in the stabilised log domain: only the kernel's sweep differs.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from ssa_dask.cluster import Executor
from ssa_dask.errors import ConvergenceWarning, SSAError, SSAInputError
from ssa_dask.kernel import Kernel

log = logging.getLogger(__name__)

#: Default stopping tolerance on the L1 error of the column marginal (marginals sum to 1).
DEFAULT_TOL = 1e-6
#: Default iteration cap.
DEFAULT_MAX_ITER = 2000


class SinkhornNumericalError(SSAError, FloatingPointError):
    """The kernel-domain iterations left the floating-point range (use the log domain)."""


@dataclass
class SinkhornResult:
    """Output of :func:`sinkhorn`.

    Attributes
    ----------
    g : (n_spots,) float64 array
        Column potential; the column scaling is ``b = exp(g / eps)``.
    n_iter : int
        Iterations run.
    errors : (n_iter,) float64 array
        Column-marginal L1 error after each iteration.
    converged : bool
        Whether the error fell below ``tol``.
    eps : float
        Entropic regularisation used.
    log_domain : bool
        Whether the stabilised log-domain sweep was used.
    seconds : float
        Wall time of the iterations.
    """

    g: np.ndarray
    n_iter: int
    errors: np.ndarray
    converged: bool
    eps: float
    log_domain: bool
    seconds: float = 0.0

    @property
    def marginal_error(self) -> float:
        """Final column-marginal L1 error."""
        return float(self.errors[-1]) if self.errors.size else float("nan")


def sinkhorn(
    kernel: Kernel,
    p: np.ndarray | da.Array,
    q: np.ndarray,
    *,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    init_g: np.ndarray | None = None,
    executor: Executor | None = None,
    progress: bool = False,
    callback: Callable[[int, np.ndarray, float, float], None] | None = None,
) -> SinkhornResult:
    """Run Sinkhorn iterations on a kernel until the marginals match.

    Parameters
    ----------
    kernel : Kernel
        Row blocks of ``K`` (or ``D`` in the log domain) and ``eps``.
    p : (n_cells,) array
        Row marginal (positive, sums to 1).  A NumPy array is chunked like the kernel rows and,
        on a cluster, persisted once.
    q : (n_spots,) array
        Column marginal (positive, sums to 1).
    tol : float
        Stop when ``||T^T 1 - q||_1 < tol``.
    max_iter : int
        Iteration cap; reaching it without convergence warns with :class:`ConvergenceWarning`.
    init_g : (n_spots,) array, optional
        Warm-start column potential (e.g. from a previous solve, a checkpoint, or a larger eps).
    executor : Executor, optional
        Where blocks are processed (default: local threads).
    progress : bool
        Show a progress bar with the marginal error.
    callback : callable, optional
        Called as ``callback(iteration, g, error, eps)`` after every iteration (e.g. a :class:`Checkpoint`).

    Returns
    -------
    SinkhornResult
    """
    executor = executor or Executor()
    n_cells, n_spots = kernel.shape
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (n_spots,):
        raise ValueError(f"q has shape {q.shape}, expected ({n_spots},)")
    p_blocks = kernel.row_vector(p, executor)
    g = np.zeros(n_spots) if init_g is None else np.array(init_g, dtype=np.float64)
    errors: list[float] = []
    start = time.perf_counter()
    bar = _progress_bar(progress, max_iter)
    converged = False
    try:
        for iteration in range(1, max_iter + 1):
            column = kernel.column_marginal(p_blocks, g, executor)
            if not np.all(np.isfinite(column)) or np.any(column <= 0):
                raise SinkhornNumericalError(
                    f"Sinkhorn iteration {iteration}: the plan's column marginal left the floating-point range "
                    f"(eps={kernel.eps:.3g}, log_domain={kernel.log_domain}); use log_domain=True or a larger lam"
                )
            error = float(np.abs(column - q).sum())
            errors.append(error)
            g = g + kernel.eps * (np.log(q) - np.log(column))
            if callback is not None:
                callback(iteration, g, error, kernel.eps)
            if bar is not None:
                bar[0].update(bar[1], advance=1, description=f"Sinkhorn  err {error:.2e}")
            if error < tol:
                converged = True
                break
    finally:
        if bar is not None:
            bar[0].stop()
    seconds = time.perf_counter() - start
    log.info("Sinkhorn: %d iterations, marginal error %.3g, %.1f s (%s domain)", len(errors), errors[-1] if errors else np.nan,
             seconds, "log" if kernel.log_domain else "kernel")
    if not converged:
        warnings.warn(
            f"Sinkhorn stopped after max_iter={max_iter} iterations with marginal error {errors[-1]:.3g} > tol={tol:.3g}",
            ConvergenceWarning, stacklevel=2,
        )
    return SinkhornResult(g=g, n_iter=len(errors), errors=np.asarray(errors), converged=converged, eps=kernel.eps,
                          log_domain=kernel.log_domain, seconds=seconds)


class Checkpoint:
    """Save the column potential every ``every`` iterations, atomically, and resume from it.

    Use as the ``callback`` of :func:`sinkhorn` and pass :meth:`load` as ``init_g``; a run cut off
    (walltime, lost cluster) then resumes where the last checkpoint left it.

    Parameters
    ----------
    path : str or Path
        ``.npz`` file holding ``g``, the iteration, ``eps`` and the number of spots.
    every : int
        Iterations between saves.
    """

    def __init__(self, path: str | Path, every: int = 10) -> None:
        self.path = Path(path)
        self.every = every

    def load(self, n_spots: int, eps: float) -> np.ndarray | None:
        """The saved potential, or None when there is no checkpoint yet.

        Raises
        ------
        SSAInputError
            The checkpoint belongs to a problem of another size or eps.
        """
        if not self.path.exists():
            return None
        with np.load(self.path) as saved:
            g, saved_eps, iteration = saved["g"], float(saved["eps"]), int(saved["iteration"])
        if g.shape != (n_spots,) or not np.isclose(saved_eps, eps, rtol=1e-6):
            raise SSAInputError(
                f"checkpoint {self.path} is for {g.shape[0]} spots and eps={saved_eps:.6g}, this run has {n_spots} "
                f"spots and eps={eps:.6g}; remove it to start afresh"
            )
        log.info("resuming Sinkhorn from %s (iteration %d)", self.path, iteration)
        return g

    def __call__(self, iteration: int, g: np.ndarray, error: float, eps: float) -> None:
        if iteration % self.every == 0:
            self.save(iteration, g, eps)

    def save(self, iteration: int, g: np.ndarray, eps: float) -> None:
        """Write the checkpoint beside its path, then rename it into place."""
        tmp = self.path.with_name(self.path.name + ".partial.npz")
        np.savez(tmp, g=g, eps=eps, iteration=iteration)
        os.replace(tmp, self.path)


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    task = bar.add_task("Sinkhorn", total=total)
    bar.start()
    return bar, task
