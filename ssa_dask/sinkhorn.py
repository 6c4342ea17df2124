"""Entropic optimal transport by Sinkhorn iterations over a :class:`~ssa_dask.kernel.Kernel`.

Solves ``min_T <T, D> - eps H(T)`` subject to ``T 1 = p``, ``T^T 1 = q``, whose solution is
``T = diag(a) K diag(b)`` with ``K = exp(-D/eps)``.  Each iteration is the classical pair of
updates ``a = p / (K b)``, ``b = q / (K^T a)``, fused into one pass over the kernel blocks:

    c = b * K^T (p / (K b))          (column marginal of the plan after the row update)
    g <- g + eps * (log q - log c)   (equivalently b <- q / (K^T a)),

with ``b = exp(g / eps)``.  The rows of the plan match ``p`` after every iteration; iterations
stop when the column marginal error ``||c - q||_1`` falls below ``tol``.  The same loop runs in the
kernel domain and in the stabilised log domain, where the kernel returns ``log c`` itself (exact at
any eps > 0): only the kernel's sweep differs.

The solver is pure: no I/O and no display.  Progress bars (:mod:`ssa_dask.progress`) and
checkpoints (:class:`Checkpoint`) are callbacks.  A refined mode or a lazy plan reuses this loop by
warm-starting it (``init_g``, ``start_iteration``) and observing it through ``callback``.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
#: The marginals must each sum to 1 within this relative tolerance.
MASS_RTOL = 1e-6

#: ``callback(iteration, g, error, eps)``, called after every iteration with the updated potential.
Callback = Callable[[int, np.ndarray, float, float], Any]


class SinkhornNumericalError(SSAError, FloatingPointError):
    """The iterations produced non-finite values.

    In the kernel domain the scalings left the floating-point range (use the log domain or a
    larger lam); in the log domain, which is stable for any eps > 0, the cost holds NaN or
    infinite values.
    """


@dataclass
class SinkhornResult:
    """Output of :func:`sinkhorn`.

    Attributes
    ----------
    g : (n_spots,) float64 array
        Column potential; the column scaling is ``b = exp(g / eps)``.
    n_iter : int
        Iterations done in all, counting the ``start_iteration`` done before a resume.
    errors : (n_iter - start_iteration,) float64 array
        Column-marginal L1 error after each iteration of this call.
    converged : bool
        Whether the error fell below ``tol``.
    eps : float
        Entropic regularisation used.
    log_domain : bool
        Whether the stabilised log-domain sweep was used.
    seconds : float
        Wall time of the iterations of this call.
    start_iteration : int
        Iterations done before this call (from a checkpoint), 0 for a fresh solve.
    """

    g: np.ndarray
    n_iter: int
    errors: np.ndarray
    converged: bool
    eps: float
    log_domain: bool
    seconds: float = 0.0
    start_iteration: int = 0

    @property
    def marginal_error(self) -> float:
        """Final column-marginal L1 error."""
        return float(self.errors[-1]) if self.errors.size else float("nan")


def sinkhorn(
    kernel: Kernel,
    p: np.ndarray | da.Array | list[Any],
    q: np.ndarray,
    *,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    init_g: np.ndarray | None = None,
    start_iteration: int = 0,
    executor: Executor | None = None,
    callback: Callback | Sequence[Callback] | None = None,
) -> SinkhornResult:
    """Run Sinkhorn iterations on a kernel until the marginals match.

    Parameters
    ----------
    kernel : Kernel
        Row blocks of ``K`` (or ``D`` in the log domain) and ``eps``.
    p : (n_cells,) array, or its split from :meth:`Kernel.row_vector`
        Row marginal (positive, finite, sums to 1).  A NumPy array is chunked like the kernel rows
        and, on a cluster, persisted once.  A split held on a cluster's workers is not checked here.
    q : (n_spots,) array
        Column marginal (positive, finite, sums to 1).
    tol : float
        Stop when ``||T^T 1 - q||_1 < tol`` (positive).
    max_iter : int
        Cap on the iteration count ``n_iter``, which includes ``start_iteration``; reaching it
        without convergence warns with :class:`ConvergenceWarning`.
    init_g : (n_spots,) array, optional
        Warm-start column potential (e.g. from a previous solve, a checkpoint, or a larger eps).
    start_iteration : int
        Iterations already done towards ``init_g`` (e.g. :meth:`Checkpoint.resume`'s
        ``iteration``): this call numbers its iterations from ``start_iteration + 1``, so the
        callback, ``max_iter`` and ``SinkhornResult.n_iter`` count the run as a whole.
    executor : Executor, optional
        Where blocks are processed (default: local threads).
    callback : callable or sequence of callables, optional
        Each called as ``callback(iteration, g, error, eps)`` after every iteration, in order,
        with the updated potential ``g`` and the error before the update, e.g.
        ``callback=[SinkhornProgress(max_iter), Checkpoint(path)]``.  The solver itself does no
        I/O; an exception raised by a callback stops it.

    Returns
    -------
    SinkhornResult

    Raises
    ------
    SSAInputError
        An argument is out of range (the message names it).  The marginals are refused, not
        renormalised, when they do not sum to 1 within ``MASS_RTOL``.
    SinkhornNumericalError
        The iterations produced non-finite values (see the class).
    """
    executor = executor or Executor()
    n_cells, n_spots = kernel.shape
    check_iteration_options(tol, max_iter, start_iteration)
    q = _check_masses(q, n_spots, "q", "spot")
    if not isinstance(p, list):
        p = _check_masses(p, n_cells, "p", "cell")
    elif all(isinstance(part, np.ndarray) for part in p):
        _check_masses(np.concatenate(p) if p else np.empty(0), n_cells, "p", "cell")
    g = np.zeros(n_spots) if init_g is None else _check_potential(init_g, n_spots)
    callbacks = _callbacks(callback)
    p_blocks = kernel.row_vector(p, executor)
    log_q = np.log(q)
    errors: list[float] = []
    start = time.perf_counter()
    converged = False
    iteration = start_iteration
    for iteration in range(start_iteration + 1, max_iter + 1):
        log_column = kernel.column_marginal(p_blocks, g, executor, log=True)
        if not np.all(np.isfinite(log_column)):
            raise _non_finite(kernel, iteration, log_column)
        error = float(np.abs(np.exp(log_column) - q).sum())
        errors.append(error)
        g = g + kernel.eps * (log_q - log_column)
        for call in callbacks:
            call(iteration, g, error, kernel.eps)
        if error < tol:
            converged = True
            break
    seconds = time.perf_counter() - start
    log.info("Sinkhorn: %d iterations (%d in this run), marginal error %.3g, %.1f s (%s domain)", iteration,
             len(errors), errors[-1], seconds, "log" if kernel.log_domain else "kernel")
    if not converged:
        warnings.warn(
            f"Sinkhorn stopped after max_iter={max_iter} iterations with marginal error {errors[-1]:.3g} > tol={tol:.3g}",
            ConvergenceWarning, stacklevel=2,
        )
    return SinkhornResult(g=g, n_iter=iteration, errors=np.asarray(errors), converged=converged, eps=kernel.eps,
                          log_domain=kernel.log_domain, seconds=seconds, start_iteration=start_iteration)


def check_iteration_options(tol: float, max_iter: int, start_iteration: int = 0) -> None:
    """Raise :class:`SSAInputError` naming the problem unless the iteration options are usable.

    :func:`sinkhorn` calls it first; a pipeline can call it before any data is read or computed.
    """
    for name, value in (("max_iter", max_iter), ("start_iteration", start_iteration)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise SSAInputError(f"{name} must be an integer, got {value!r}")
    if max_iter < 1:
        raise SSAInputError(f"max_iter must be at least 1, got {max_iter}")
    if start_iteration < 0:
        raise SSAInputError(f"start_iteration must be at least 0, got {start_iteration}")
    if start_iteration >= max_iter:
        raise SSAInputError(
            f"start_iteration={start_iteration} (e.g. the iteration of a checkpoint) leaves no iteration below "
            f"max_iter={max_iter}; raise max_iter to continue"
        )
    if not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol <= 0:
        raise SSAInputError(f"tol must be a positive finite number, got {tol!r}")


def _check_masses(values: Any, size: int, name: str, unit: str) -> np.ndarray:
    """``values`` as a float64 vector of ``size`` positive finite masses summing to 1, or SSAInputError."""
    masses = np.asarray(values, dtype=np.float64)
    if masses.shape != (size,):
        raise SSAInputError(f"{name} has shape {masses.shape}, expected ({size},): one mass per {unit}")
    bad = np.flatnonzero(~np.isfinite(masses) | (masses <= 0))
    if bad.size:
        raise SSAInputError(
            f"{name} must be positive and finite: {bad.size} {unit} mass(es) are not (first: index {bad[0]}, "
            f"value {masses[bad[0]]!r})"
        )
    total = float(masses.sum())
    if abs(total - 1.0) > MASS_RTOL:
        raise SSAInputError(f"{name} sums to {total:.9g}, not 1 (within {MASS_RTOL:g}); divide it by its sum")
    return masses


def _check_potential(init_g: Any, n_spots: int) -> np.ndarray:
    g = np.array(init_g, dtype=np.float64)
    if g.shape != (n_spots,):
        raise SSAInputError(f"init_g has shape {g.shape}, expected ({n_spots},): one potential per spot")
    bad = np.flatnonzero(~np.isfinite(g))
    if bad.size:
        raise SSAInputError(f"init_g holds {bad.size} NaN or infinite value(s) (first: index {bad[0]})")
    return g


def _callbacks(callback: Callback | Sequence[Callback] | None) -> list[Callback]:
    callbacks = [] if callback is None else [callback] if callable(callback) else list(callback)
    for call in callbacks:
        if not callable(call):
            raise SSAInputError(f"callback must be a callable or a sequence of callables, got {call!r}")
    return callbacks


def _non_finite(kernel: Kernel, iteration: int, log_column: np.ndarray) -> SinkhornNumericalError:
    bad = np.flatnonzero(~np.isfinite(log_column))
    where = f"{bad.size} spot(s), first: spot {bad[0]}"
    if kernel.log_domain:
        return SinkhornNumericalError(
            f"Sinkhorn iteration {iteration}: non-finite column marginal in the log domain ({where}, "
            f"eps={kernel.eps:.3g}). "
            "The log domain is stable for any eps > 0, so the cost blocks hold NaN or infinite values (bad input) "
            "or this is a bug in ssa_dask; please report it"
        )
    return SinkhornNumericalError(
        f"Sinkhorn iteration {iteration}: the plan's column marginal left the floating-point range ({where}, "
        f"eps={kernel.eps:.3g}, log_domain=False); use log_domain=True or a larger lam"
    )


@dataclass(frozen=True)
class SavedState:
    """A Sinkhorn state read back by :meth:`Checkpoint.resume`.

    Attributes
    ----------
    g : (n_spots,) float64 array
        Column potential after ``iteration`` iterations: pass it as ``init_g``.
    iteration : int
        Iterations done when it was saved: pass it as ``start_iteration``.
    """

    g: np.ndarray
    iteration: int


class Checkpoint:
    """Save the column potential every ``every`` iterations, atomically, and resume from it.

    Use as (one of) the ``callback`` of :func:`sinkhorn`, and resume a run cut off (walltime, lost
    cluster) where the last checkpoint left it::

        saver = Checkpoint(path)
        state = saver.resume(n_spots, kernel.eps)
        result = sinkhorn(kernel, p, q, callback=saver,
                          init_g=state.g if state else None,
                          start_iteration=state.iteration if state else 0)

    ``result.n_iter`` then counts the iterations before the resume too.

    Parameters
    ----------
    path : str or Path
        ``.npz`` file holding ``g``, the iteration, ``eps`` and the number of spots.
    every : int
        Iterations between saves.
    """

    def __init__(self, path: str | Path, every: int = 10) -> None:
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise SSAInputError(f"checkpoint interval must be a positive integer, got {every!r}")
        self.path = Path(path)
        self.every = int(every)

    def resume(self, n_spots: int, eps: float) -> SavedState | None:
        """The saved potential and its iteration, or None when there is no checkpoint yet.

        Raises
        ------
        SSAInputError
            The checkpoint cannot be read, or belongs to a problem of another size or eps.
        """
        if not self.path.exists():
            return None
        try:
            with np.load(self.path) as saved:
                g = np.asarray(saved["g"], np.float64)
                saved_eps, iteration = float(saved["eps"]), int(saved["iteration"])
        except Exception as exc:  # a damaged file: zip, pickle, key or value errors alike
            raise SSAInputError(f"checkpoint {self.path} cannot be read ({exc}); remove it to start afresh") from exc
        if g.shape != (n_spots,) or not np.isclose(saved_eps, eps, rtol=1e-6):
            raise SSAInputError(
                f"checkpoint {self.path} holds a potential of shape {g.shape} and eps={saved_eps:.6g}, this run has "
                f"{n_spots} spots and eps={eps:.6g}; remove it to start afresh"
            )
        if iteration < 1 or not np.all(np.isfinite(g)):
            raise SSAInputError(f"checkpoint {self.path} holds a damaged state; remove it to start afresh")
        log.info("resuming Sinkhorn from %s (iteration %d)", self.path, iteration)
        return SavedState(g=g, iteration=iteration)

    def __call__(self, iteration: int, g: np.ndarray, error: float, eps: float) -> None:
        if iteration % self.every == 0:
            self.save(iteration, g, eps)

    def save(self, iteration: int, g: np.ndarray, eps: float) -> None:
        """Write the checkpoint beside its path, fsync it, then rename it into place."""
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            with open(partial, "wb") as file:
                np.savez(file, g=np.asarray(g, np.float64), eps=eps, iteration=iteration)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, self.path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_directory(self.path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows opening a directory)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
