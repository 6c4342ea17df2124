"""The kernel as the Sinkhorn solver sees it: operations over row blocks, wherever they live.

A :class:`Kernel` is ``K = exp(-D / eps)`` (kernel domain) or the cost ``D`` itself (log domain),
held by a :class:`~ssa_dask.kernel.storage.KernelStorage` (row blocks in this process or in
workers' memory, or in a kernel store on disk).  It offers the few operations the solver and the
later passes need, each one pass over the blocks with few, large tasks: the plan's column marginal
after the row update (:meth:`Kernel.column_marginal`, one fused sweep per Sinkhorn iteration), the
top-k entries of each row of the plan, and kernel-vector products.  The solver never knows where
the blocks are, as ott-jax's solvers never know where a geometry keeps its cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import dask.array as da
import numpy as np

from ssa_dask.kernel._block_math import REDUCTIONS, apply_columns, apply_rows, column_marginal_block, top_k_block
from ssa_dask.cluster import Executor
from ssa_dask.kernel.storage import KernelStorage


@dataclass
class Kernel:
    """The SSA kernel (or cost, in the log domain) over row blocks held by a storage.

    Attributes
    ----------
    storage : KernelStorage
        Where the row blocks live; each block holds float32 ``K = exp(-D/eps)`` rows, or ``D`` rows
        when ``log_domain``.
    eps : float
        Entropic regularisation ``eps`` (absolute).
    log_domain : bool
        Whether the blocks hold the cost (stabilised log-domain iterations) or the kernel.
    max_cost : float
        ``max D`` over all entries (``lam = eps / max_cost``).
    """

    storage: KernelStorage
    eps: float
    log_domain: bool
    max_cost: float

    @property
    def blocks(self) -> list[Any]:
        """The storage's block handles, in row order."""
        return self.storage.blocks

    @property
    def bounds(self) -> np.ndarray:
        """Row offsets of the blocks, ``(n_blocks + 1,)``."""
        return self.storage.bounds

    @property
    def n_spots(self) -> int:
        """Number of columns."""
        return self.storage.n_spots

    @property
    def reused(self) -> bool:
        """Whether the blocks come from a complete store kept for a checkpoint (not rebuilt)."""
        return self.storage.reused

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_cells, n_spots)``."""
        return (int(self.bounds[-1]), int(self.n_spots))

    @property
    def lam(self) -> float:
        """Relative regularisation ``eps / max D``."""
        return self.eps / self.max_cost if self.max_cost > 0 else float("inf")

    def row_vector(self, values: Any, executor: Executor) -> list[Any]:
        """Split a per-cell vector into the blocks' row ranges (held on the workers of a cluster).

        A list already split (the output of this method) is returned unchanged.
        """
        if isinstance(values, list):
            return values
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.shape[0],):
            raise ValueError(f"per-cell vector has shape {values.shape}, expected ({self.shape[0]},)")
        if not executor.distributed:
            return [values[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        chunks = (tuple(np.diff(self.bounds).tolist()),)
        return executor.materialize_blocks(da.from_array(values, chunks=chunks, name=False))

    def column_marginal(self, p: Any, g: np.ndarray, executor: Executor, *, log: bool = False) -> np.ndarray:
        """Column marginal of the plan after the row update, in one pass over the blocks.

        With ``b = exp(g / eps)`` and ``a = p / (K b)``, returns ``b * (K^T a)``: the column sums of
        ``T = diag(a) K diag(b)``, whose row sums are ``p`` exactly.  In the log domain each block
        gives the log of its column sums (exact at any eps) and the blocks are combined by a
        log-sum-exp, so ``log=True`` never leaves the floating-point range there.

        Parameters
        ----------
        p : (n_cells,) array, or its split from :meth:`row_vector`
            Row masses.
        g : (n_spots,) float64 array
            Column potential.
        executor : Executor
        log : bool
            Return ``log`` of the marginal (in the kernel domain, the log of the summed marginal:
            ``-inf`` where it underflowed).

        Returns
        -------
        (n_spots,) float64 array
        """
        marginal = self.map_blocks(column_marginal_block, executor, self.row_vector(p, executor),
                                   reduce="logsumexp" if self.log_domain else "sum", g=np.asarray(g, np.float64),
                                   eps=self.eps, log_domain=self.log_domain)
        if log == self.log_domain:
            return marginal
        with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
            return np.log(marginal) if log else np.exp(marginal)

    def top_k(self, p: Any, g: np.ndarray, k: int, executor: Executor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``k`` largest entries of each row of the plan, their row-normalised weight, and ``f``.

        Parameters
        ----------
        p : (n_cells,) array, or its split from :meth:`row_vector`
            Row masses.
        g : (n_spots,) float64 array
            Column potential.
        k : int
            Entries per row, ``1 <= k <= n_spots``.
        executor : Executor

        Returns
        -------
        index : (n_cells, k) int64 array
            Spot indices, largest plan entry first.
        probability : (n_cells, k) float64 array
            ``T_ij / sum_l T_il`` of those entries.
        f : (n_cells,) float64 array
            Row potential, ``a = exp(f / eps)``.
        """
        parts = self.map_blocks(top_k_block, executor, self.row_vector(p, executor), g=np.asarray(g, np.float64),
                                eps=self.eps, log_domain=self.log_domain, k=k, label="assignment (top-k)")
        values = np.concatenate(parts, axis=0)
        return values[:, :k].astype(np.int64), values[:, k : 2 * k], values[:, -1]

    def apply(self, v: np.ndarray, axis: int, executor: Executor) -> np.ndarray:
        """Kernel-vector product: ``K v`` (``axis=1``, v over spots) or ``K^T v`` (``axis=0``, v over cells)."""
        v = np.asarray(v, dtype=np.float64)
        if axis == 1:
            return np.concatenate(self.map_blocks(apply_rows, executor, v=v, eps=self.eps, log_domain=self.log_domain))
        if axis == 0:
            return self.map_blocks(apply_columns, executor, self.row_vector(v, executor), reduce="sum", eps=self.eps,
                                   log_domain=self.log_domain)
        raise ValueError("axis must be 0 or 1")

    def map_blocks(self, func: Callable[..., Any], executor: Executor, *per_block: list[Any],
                   reduce: Literal["sum", "logsumexp"] | None = None, label: str | None = None, **kwargs: Any) -> Any:
        """Apply ``func(block, *per_block_args, **kwargs)`` to every block, with few, large tasks.

        Blocks are grouped into one task per worker thread: on a cluster each task takes blocks held
        by the worker it runs on (no block moves), so an iteration costs a handful of tasks however
        many blocks there are.

        Parameters
        ----------
        func : callable
            Called as ``func(block, *per_block_args, **kwargs)``.
        executor : Executor
        *per_block : lists
            Values split like the blocks (e.g. from :meth:`row_vector`).
        reduce : {"sum", "logsumexp"}, optional
            Combine the per-block arrays inside each task and then across tasks: their sum, or
            ``log sum exp`` of arrays that hold logs (stable for any magnitude).
        label : str, optional
            Progress-bar label for a long pass (shown when the executor shows progress).
        **kwargs
            Passed to every call.

        Returns
        -------
        list or numpy.ndarray
            The per-block results in block order, or their reduction.
        """
        groups = self.storage.task_groups(executor)
        outputs = executor.map(
            partial(_run_group, func, reduce),
            [[self.blocks[i] for i in group] for group in groups],
            *[[[values[i] for i in group] for group in groups] for values in per_block],
            label=label,
            **kwargs,
        )
        if reduce is not None:
            return REDUCTIONS[reduce](outputs)
        ordered: list[Any] = [None] * len(self.blocks)
        for group, results in zip(groups, outputs):
            for index, result in zip(group, results):
                ordered[index] = result
        return ordered

    def close(self, keep_store: bool = False) -> None:
        """Release the blocks and remove a kernel store on disk, unless ``keep_store`` (kept for a resume)."""
        self.storage.close(keep=keep_store)


def _run_group(func: Callable[..., Any], reduce: Literal["sum", "logsumexp"] | None, blocks: list[Any],
               *per_block: list[Any], **kwargs: Any) -> Any:
    """Run ``func`` over the blocks of one task, one after the other; reduce the results when asked.

    A reduction is accumulated block by block (the same sums, in the same order, as reducing the
    stacked results), so a task holds one partial result however many blocks it runs.
    """
    results = (func(block, *(values[i] for values in per_block), **kwargs) for i, block in enumerate(blocks))
    if reduce is None:
        return list(results)
    total = next(results)
    for result in results:
        total = REDUCTIONS[reduce]([total, result])
    return total


