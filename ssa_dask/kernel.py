"""Where the Gibbs kernel lives and how it is applied.

A :class:`Kernel` holds the row blocks of ``K = exp(-D / eps)`` (kernel domain) or of the cost
``D`` itself (log domain).  A block is a NumPy array in this process, a ``distributed`` future
whose data sits in a worker's memory, or a :class:`~ssa_dask.kernel_store.StoredBlock` of a kernel
store on disk, memory-mapped by whichever task needs it.  The Sinkhorn loop only calls :meth:`Kernel.column_marginal`, one task per block
and one fused pass over each block per iteration, so it never knows where the blocks are.

Blocks on a cluster are computed from a graph (never scattered), so a lost worker's blocks are
recomputed from lineage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np

from ssa_dask import _kernels
from ssa_dask.cluster import Executor
from ssa_dask.errors import SSAInputError
from ssa_dask.kernel_store import COST_ARRAY, KERNEL_ARRAY, KernelStore, StoredBlock, local_directory

log = logging.getLogger(__name__)

#: Below this relative regularisation ``lam = eps / max D`` the log domain is chosen automatically:
#: ``exp(-1/lam)`` and the scalings ``exp(g/eps)`` leave the safe float32 range.
LOG_DOMAIN_BELOW_LAM = 0.02

Storage = Literal["memory", "zarr"]


def _resolve(block: Any) -> np.ndarray:
    return block.load() if isinstance(block, StoredBlock) else block


@dataclass
class Kernel:
    """Row blocks of the SSA kernel, in memory (local or on workers) or in Zarr.

    Attributes
    ----------
    blocks : list
        One handle per row block: NumPy array, ``distributed.Future`` or
        :class:`~ssa_dask.kernel_store.StoredBlock`;
        each holds float32 ``K = exp(-D/eps)`` rows, or ``D`` rows when ``log_domain``.
    bounds : (n_blocks + 1,) int array
        Row offsets of the blocks.
    n_spots : int
        Number of columns.
    eps : float
        Entropic regularisation ``eps`` (absolute).
    log_domain : bool
        Whether the blocks hold the cost (stabilised log-domain iterations) or the kernel.
    max_cost : float
        ``max D`` over all entries (``lam = eps / max_cost``).
    storage : {"memory", "zarr"}
        Where the blocks live.
    store : KernelStore or None
        The kernel store on disk when ``storage == "zarr"`` (removed by :meth:`close`).
    reused : bool
        Whether the blocks come from a complete store kept for a checkpoint (not rebuilt).
    """

    blocks: list[Any]
    bounds: np.ndarray
    n_spots: int
    eps: float
    log_domain: bool
    max_cost: float
    storage: Storage = "memory"
    store: KernelStore | None = None
    reused: bool = False
    _groups: list[list[int]] | None = field(default=None, repr=False)

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
        marginal = self.map_blocks(_column_marginal_block, executor, self.row_vector(p, executor),
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
        parts = self.map_blocks(_top_k_block, executor, self.row_vector(p, executor), g=np.asarray(g, np.float64),
                                eps=self.eps, log_domain=self.log_domain, k=k)
        values = np.concatenate(parts, axis=0)
        return values[:, :k].astype(np.int64), values[:, k : 2 * k], values[:, -1]

    def apply(self, v: np.ndarray, axis: int, executor: Executor) -> np.ndarray:
        """Kernel-vector product: ``K v`` (``axis=1``, v over spots) or ``K^T v`` (``axis=0``, v over cells)."""
        v = np.asarray(v, dtype=np.float64)
        if axis == 1:
            return np.concatenate(self.map_blocks(_apply_rows, executor, v=v, eps=self.eps, log_domain=self.log_domain))
        if axis == 0:
            return self.map_blocks(_apply_columns, executor, self.row_vector(v, executor), reduce="sum", eps=self.eps,
                                   log_domain=self.log_domain)
        raise ValueError("axis must be 0 or 1")

    def map_blocks(self, func: Callable[..., Any], executor: Executor, *per_block: list[Any],
                   reduce: Literal["sum", "logsumexp"] | None = None, **kwargs: Any) -> Any:
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
        **kwargs
            Passed to every call.

        Returns
        -------
        list or numpy.ndarray
            The per-block results in block order, or their reduction.
        """
        groups = self._task_groups(executor)
        outputs = executor.map(
            partial(_run_group, func, reduce),
            [[self.blocks[i] for i in group] for group in groups],
            *[[[values[i] for i in group] for group in groups] for values in per_block],
            **kwargs,
        )
        if reduce is not None:
            return _REDUCTIONS[reduce](outputs)
        ordered: list[Any] = [None] * len(self.blocks)
        for group, results in zip(groups, outputs):
            for index, result in zip(group, results):
                ordered[index] = result
        return ordered

    def _task_groups(self, executor: Executor) -> list[list[int]]:
        """Block indices per task: contiguous runs, one per thread; on a cluster, by holding worker."""
        if self._groups is not None:
            return self._groups
        indices = list(range(len(self.blocks)))
        if executor.distributed and self.storage == "memory":
            who_has = executor.client.who_has(self.blocks)
            threads = executor.client.nthreads()
            by_worker: dict[str, list[int]] = {}
            for index, block in zip(indices, self.blocks):
                holders = who_has.get(block.key) or ["?"]
                by_worker.setdefault(holders[0], []).append(index)
            groups = [part for worker, held in by_worker.items() for part in _split(held, threads.get(worker, 1))]
        else:
            groups = _split(indices, executor.n_threads())
        self._groups = groups
        return groups

    def close(self, keep_store: bool = False) -> None:
        """Release the blocks and remove the kernel store, unless ``keep_store`` (kept for a resume)."""
        self.blocks = []
        self._groups = None
        if self.store is not None and not keep_store:
            self.store.remove()


def _split(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` in at most ``parts`` contiguous, nearly equal, non-empty runs."""
    runs = np.array_split(np.asarray(indices, dtype=int), max(1, min(parts, len(indices))))
    return [run.tolist() for run in runs if len(run)]


def _run_group(func: Callable[..., Any], reduce: Literal["sum", "logsumexp"] | None, blocks: list[Any],
               *per_block: list[Any], **kwargs: Any) -> Any:
    """Run ``func`` over the blocks of one task, one after the other; reduce the results when asked."""
    results = [func(block, *(values[i] for values in per_block), **kwargs) for i, block in enumerate(blocks)]
    return results if reduce is None else _REDUCTIONS[reduce](results)


def _log_sum_exp(parts: list[np.ndarray]) -> np.ndarray:
    """``log sum_k exp(parts[k])`` elementwise; non-finite inputs give non-finite outputs, silently."""
    with np.errstate(invalid="ignore"):
        return np.logaddexp.reduce(np.asarray(parts), axis=0)


#: How :meth:`Kernel.map_blocks` combines per-block arrays: a plain sum, or a log-sum-exp of logs.
_REDUCTIONS: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {
    "sum": lambda parts: np.sum(parts, axis=0),
    "logsumexp": _log_sum_exp,
}


def _gibbs(block: Any, eps: float, log_domain: bool) -> np.ndarray:
    values = np.asarray(_resolve(block), np.float64)
    return np.exp(-values / eps) if log_domain else values


def _apply_rows(block: Any, v: np.ndarray, eps: float, log_domain: bool) -> np.ndarray:
    return _gibbs(block, eps, log_domain) @ v


def _apply_columns(block: Any, v: np.ndarray, eps: float, log_domain: bool) -> np.ndarray:
    return _gibbs(block, eps, log_domain).T @ v


def _scaling(g: np.ndarray, eps: float) -> np.ndarray:
    """``b = exp((g - max g)/eps)``: the column scaling up to a constant factor (which cancels)."""
    return np.exp((g - g.max()) / eps)


def _column_marginal_block(block: Any, p: np.ndarray, g: np.ndarray, eps: float, log_domain: bool) -> np.ndarray:
    """The block's share of the plan's column marginal; its log in the log domain."""
    values = _resolve(block)
    out = np.zeros(values.shape[1], dtype=np.float64)
    rows = np.ascontiguousarray(p, dtype=np.float64)
    if log_domain:
        _kernels.log_sweep(values, rows, g, eps, out)
    else:
        _kernels.kernel_sweep(values, rows, _scaling(g, eps).astype(np.float32), out)
    return out


def _top_k_block(block: Any, p: np.ndarray, g: np.ndarray, eps: float, log_domain: bool, k: int) -> np.ndarray:
    """Top-k columns of each row of the plan, their row-normalised weights, and the row potential.

    Row ``i`` of the plan is proportional to ``K_ij b_j``.  In the kernel domain the scores stay
    float32 like the kernel (row sums in float64); the log domain works in float64, where the
    scores span a range float32 cannot resolve: each row is shifted by its maximum (so its sum is
    at least 1 and ``f`` is finite at any eps) and ranked by its log scores, which keep their order
    where the scores themselves underflow to 0.
    """
    values = _resolve(block)
    if log_domain:
        log_score = (g[None, :] - np.asarray(values, np.float64)) / eps
        shift = log_score.max(axis=1, keepdims=True)
        rank = log_score - shift
        score = np.exp(rank)
        log_offset = shift[:, 0]
    else:
        score = values * _scaling(g, eps).astype(np.float32)[None, :]
        rank = score
        log_offset = np.full(values.shape[0], g.max() / eps)
    row_sum = score.sum(axis=1, dtype=np.float64)
    if k == 1:
        top = rank.argmax(axis=1)[:, None]
    elif k < rank.shape[1]:
        top = np.argpartition(-rank, k - 1, axis=1)[:, :k]
    else:
        top = np.tile(np.arange(k), (rank.shape[0], 1))
    top_score = np.take_along_axis(score, top, axis=1).astype(np.float64)
    order = np.argsort(-np.take_along_axis(rank, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    probability = np.take_along_axis(top_score, order, axis=1) / row_sum[:, None]
    f = eps * (np.log(p) - np.log(row_sum) - log_offset)
    return np.concatenate([top.astype(np.float64), probability, f[:, None]], axis=1)


def _block_stats(block: Any) -> np.ndarray:
    """Largest finite cost, number of NaN rows (constant cells) and the first such row of a block."""
    values = _resolve(block)
    nan_rows = np.flatnonzero(np.isnan(values).any(axis=1))
    finite_max = np.nanmax(values) if nan_rows.size < values.shape[0] else -np.inf
    return np.array([finite_max, nan_rows.size, nan_rows[0] if nan_rows.size else -1], dtype=np.float64)


def _store_block(block: np.ndarray, targets: list[StoredBlock], block_info: dict | None = None) -> np.ndarray:
    """Write a cost block to its chunk of the store (atomically; a retry writes the same bytes)."""
    targets[block_info[0]["chunk-location"][0]].write(block)
    return _block_stats(block)[None, :]


def _exp_stored_block(cost: StoredBlock, kernel: StoredBlock, eps: float) -> None:
    """Turn a stored cost chunk into its kernel chunk; idempotent, so a retried task is harmless.

    The kernel chunk is written beside its name and renamed into place before the cost chunk is
    removed: a task that runs again finds the kernel chunk complete and only tidies up.
    """
    if not kernel.is_complete():
        kernel.write(_to_kernel(np.array(cost.load()), eps))
    cost.remove()


def _to_kernel(cost: np.ndarray, eps: float) -> np.ndarray:
    """``exp(-D/eps)`` in place, float32."""
    np.multiply(cost, np.float32(-1.0 / eps), out=cost)
    return np.exp(cost, out=cost)


def _cost_to_kernel(cost: np.ndarray, eps: float) -> np.ndarray:
    return _to_kernel(cost.copy(), eps)


def _max_cost(stats: np.ndarray, bounds: np.ndarray) -> float:
    """``max D`` from per-block stats; raises on cells whose correlation is undefined."""
    n_bad = int(stats[:, 1].sum())
    if n_bad:
        first = int(min(bounds[i] + stats[i, 2] for i in range(len(stats)) if stats[i, 2] >= 0))
        raise SSAInputError(
            f"{n_bad} cell(s) have a constant z-profile over the selected genes (first: row {first}), e.g. an "
            "empty cell or one expressing no selected gene, so their Pearson correlation is undefined; remove them"
        )
    return float(stats[:, 0].max())


def _resolve_eps(max_cost: float, lam: float | None, eps: float | None) -> float:
    if eps is not None:
        if not eps > 0:
            raise SSAInputError(f"eps must be positive, got {eps}")
        return float(eps)
    if lam is None or not lam > 0:
        raise SSAInputError(f"lam must be positive, got {lam}")
    if max_cost <= 0:
        raise SSAInputError("every cell correlates perfectly with every spot (max D = 0): nothing to align")
    return float(lam * max_cost)


def _choose_domain(log_domain: bool | str, eps: float, max_cost: float) -> bool:
    if log_domain == "auto":
        return bool(max_cost > 0 and eps / max_cost < LOG_DOMAIN_BELOW_LAM)
    return bool(log_domain)


def build_kernel(
    cost: da.Array,
    executor: Executor,
    *,
    lam: float | None = 0.05,
    eps: float | None = None,
    log_domain: bool | Literal["auto"] = "auto",
    storage: Storage = "memory",
    path: str | Path | None = None,
    checkpoint: str | None = None,
    fingerprint: str | None = None,
) -> Kernel:
    """Materialise the kernel from lazy cost blocks, in worker memory or in Zarr.

    Two passes: the first computes ``D`` blockwise and its maximum (``eps = lam * max D``), the
    second turns ``D`` into ``K = exp(-D/eps)`` (skipped in the log domain, which keeps ``D``).
    Memory holds about one copy of the blocks at a time.

    Parameters
    ----------
    cost : dask.array.Array
        Lazy ``(n_cells, n_spots)`` float32 cost ``D``, chunked along rows only.
    executor : Executor
    lam : float
        Relative regularisation, ``eps = lam * max D`` (used when ``eps`` is None).
    eps : float, optional
        Absolute regularisation; overrides ``lam``.
    log_domain : bool or "auto"
        Keep ``D`` and iterate in the log domain; ``"auto"`` does so when
        ``eps / max D < LOG_DOMAIN_BELOW_LAM``.
    storage : {"memory", "zarr"}
        Hold blocks in worker memory, or write them to a Zarr store streamed each iteration.
    path : path, optional
        Directory in which the kernel store of ``storage="zarr"`` is created (default: the system's
        temporary directory); :meth:`Kernel.close` removes the store.  On a multi-machine cluster it
        must be on a file system every worker mounts; URLs are refused.
    checkpoint : str, optional
        Checkpoint file of the run: the store is named after it and kept when the run is cut off, and
        a complete store of the same ``fingerprint`` is reused instead of rebuilt.
    fingerprint : str, optional
        Identity of the problem (data, genes, regularisation) that a kept store must match.

    Returns
    -------
    Kernel
    """
    bounds = np.cumsum((0,) + cost.chunks[0])
    n_spots = int(cost.shape[1])
    if storage == "memory":
        blocks = executor.materialize_blocks(cost, label="cost blocks")
        stats = np.asarray(executor.map(_block_stats, blocks))
        max_cost = _max_cost(stats, bounds)
        eps_value = _resolve_eps(max_cost, lam, eps)
        use_log = _choose_domain(log_domain, eps_value, max_cost)
        if not use_log:
            if executor.distributed:
                # New futures from the graph: each cost block is released once its kernel block exists,
                # and a lost kernel block is recomputed from lineage.
                blocks = executor.submit_map(_cost_to_kernel, blocks, eps=eps_value)
            else:
                executor.map(_to_kernel, blocks, eps=eps_value)  # in place: these arrays are ours alone
        return Kernel(blocks=blocks, bounds=bounds, n_spots=n_spots, eps=eps_value, log_domain=use_log,
                      max_cost=max_cost, storage="memory")
    if storage != "zarr":
        raise SSAInputError(f"kernel storage must be 'memory' or 'zarr', got {storage!r}")
    parent = local_directory(path, "kernel_path")
    if checkpoint is not None and fingerprint is not None:
        kept = KernelStore.open_complete(parent, checkpoint, fingerprint)
        if kept is not None:
            store, manifest = kept
            log.info("reusing the complete kernel store %s of the checkpointed run", store.root)
            blocks = store.blocks(COST_ARRAY if manifest["log_domain"] else KERNEL_ARRAY)
            return Kernel(blocks=blocks, bounds=bounds, n_spots=n_spots, eps=manifest["eps"],
                          log_domain=manifest["log_domain"], max_cost=manifest["max_cost"], storage="zarr", store=store,
                          reused=True)
    store = KernelStore.create(parent, cost.shape, bounds, checkpoint=checkpoint)
    try:
        cost_targets = store.blocks(COST_ARRAY)
        stats_array = cost.map_blocks(_store_block, cost_targets, dtype=np.float64,
                                      chunks=((1,) * cost.numblocks[0], (3,)), meta=np.empty((0, 0)))
        (stats,) = executor.compute(stats_array, label="cost -> kernel store")
        max_cost = _max_cost(stats, bounds)
        eps_value = _resolve_eps(max_cost, lam, eps)
        use_log = _choose_domain(log_domain, eps_value, max_cost)
        if use_log:
            blocks = cost_targets
        else:
            blocks = store.blocks(KERNEL_ARRAY)
            executor.map(_exp_stored_block, cost_targets, blocks, eps=eps_value)
        store.mark_complete({"fingerprint": fingerprint, "eps": eps_value, "max_cost": max_cost, "log_domain": use_log})
    except BaseException:
        store.remove()
        raise
    log.info("kernel blocks in %s (%.2f GB)", store.root, cost.size * 4 / 1e9)
    return Kernel(blocks=blocks, bounds=bounds, n_spots=n_spots, eps=eps_value, log_domain=use_log, max_cost=max_cost,
                  storage="zarr", store=store)


def kernel_from_array(
    K: np.ndarray, *, eps: float, block_rows: int | None = None, log_domain: bool = False,
    max_cost: float | None = None, executor: Executor | None = None,
) -> Kernel:
    """Wrap a given kernel (or cost, ``log_domain=True``) matrix as a :class:`Kernel`.

    For tests, benchmarks and users who build their own kernel.

    Parameters
    ----------
    K : (n, S) array
        ``exp(-D/eps)``, or ``D`` when ``log_domain``; stored as float32.
    eps : float
        Entropic regularisation the kernel was made with.
    block_rows : int, optional
        Rows per block (default 4096).
    log_domain : bool
        Whether ``K`` holds the cost ``D``.
    max_cost : float, optional
        ``max D`` (recovered from ``K`` when omitted).
    executor : Executor, optional
        A cluster executor to hold the blocks on its workers (default: this process).
    """
    values = np.ascontiguousarray(K, dtype=np.float32)
    rows = block_rows or 4096
    bounds = np.append(np.arange(0, values.shape[0], rows), values.shape[0])
    if max_cost is None:
        max_cost = float(values.max()) if log_domain else float(-eps * np.log(max(float(values.min()), np.finfo(np.float64).tiny)))
    if executor is not None and executor.distributed:
        blocks = executor.materialize_blocks(da.from_array(values, chunks=(rows, values.shape[1]), name=False))
    else:
        blocks = [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return Kernel(blocks=blocks, bounds=bounds, n_spots=int(values.shape[1]), eps=float(eps), log_domain=log_domain,
                  max_cost=max_cost)
