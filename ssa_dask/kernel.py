"""Where the Gibbs kernel lives and how it is applied.

A :class:`Kernel` holds the row blocks of ``K = exp(-D / eps)`` (kernel domain) or of the cost
``D`` itself (log domain) as a Dask array: persisted in worker memory, or in a Zarr store that
every iteration streams.  The Sinkhorn loop only calls :meth:`Kernel.column_marginal`, one fused
pass over the blocks per iteration, so it never knows where the blocks are.

Blocks are persisted from a graph (never scattered), so a lost worker's blocks are recomputed
from lineage.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np

from ssa_dask import _kernels
from ssa_dask.cluster import Executor
from ssa_dask.errors import SSAInputError

log = logging.getLogger(__name__)

#: Below this relative regularisation ``lam = eps / max D`` the log domain is chosen automatically:
#: ``exp(-1/lam)`` and the scalings ``exp(g/eps)`` leave the safe float32 range.
LOG_DOMAIN_BELOW_LAM = 0.02

Storage = Literal["memory", "zarr"]


@dataclass
class Kernel:
    """Row blocks of the SSA kernel, in worker memory or in Zarr.

    Attributes
    ----------
    blocks : dask.array.Array
        ``(n_cells, n_spots)`` float32, chunked along rows: ``K = exp(-D/eps)`` when
        ``log_domain`` is false, else ``D``.
    eps : float
        Entropic regularisation ``eps`` (absolute).
    log_domain : bool
        Whether ``blocks`` holds the cost (stabilised log-domain iterations) or the kernel.
    max_cost : float
        ``max D`` over all entries (``lam = eps / max_cost``).
    storage : {"memory", "zarr"}
        Where the blocks live.
    path : pathlib.Path or None
        The Zarr store of the blocks when ``storage == "zarr"``.
    temporary : bool
        Whether :meth:`close` removes ``path``.
    """

    blocks: da.Array
    eps: float
    log_domain: bool
    max_cost: float
    storage: Storage = "memory"
    path: Path | None = None
    temporary: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_cells, n_spots)``."""
        return (int(self.blocks.shape[0]), int(self.blocks.shape[1]))

    @property
    def lam(self) -> float:
        """Relative regularisation ``eps / max D``."""
        return self.eps / self.max_cost if self.max_cost > 0 else float("inf")

    def row_vector(self, values: np.ndarray | da.Array, executor: Executor) -> da.Array:
        """A per-cell vector as a Dask array chunked like the blocks' rows (persisted once on a cluster)."""
        chunks = (self.blocks.chunks[0],)
        if isinstance(values, da.Array):
            return values if values.chunks == chunks else values.rechunk(chunks)
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.shape[0],):
            raise ValueError(f"per-cell vector has shape {values.shape}, expected ({self.shape[0]},)")
        vector = da.from_array(values, chunks=chunks, name=False)
        return executor.persist(vector) if executor.distributed else vector

    def column_marginal(self, p: da.Array, g: np.ndarray, executor: Executor) -> np.ndarray:
        """Column marginal of the plan after the row update, in one pass over the blocks.

        With ``b = exp(g / eps)`` and ``a = p / (K b)``, returns ``b * (K^T a)``: the column sums of
        ``T = diag(a) K diag(b)``, whose row sums are ``p`` exactly.

        Parameters
        ----------
        p : (n_cells,) array or dask.array.Array
            Row masses (best: from :meth:`row_vector`, so a cluster holds them once).
        g : (n_spots,) float64 array
            Column potential.
        executor : Executor

        Returns
        -------
        (n_spots,) float64 array
        """
        parts = da.map_blocks(
            _column_marginal_block, self.blocks, self.row_vector(p, executor)[:, None], g, self.eps, self.log_domain,
            dtype=np.float64, chunks=((1,) * self.blocks.numblocks[0], (self.shape[1],)), meta=np.empty((0, 0)),
        )
        (total,) = executor.compute(parts.sum(axis=0))
        return total

    def top_k(self, p: da.Array, g: np.ndarray, k: int, executor: Executor, label: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``k`` largest entries of each row of the plan, their row-normalised weight, and ``f``.

        Parameters
        ----------
        p : (n_cells,) array or dask.array.Array
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
        packed = da.map_blocks(
            _top_k_block, self.blocks, self.row_vector(p, executor)[:, None], g, self.eps, self.log_domain, k,
            dtype=np.float64, chunks=(self.blocks.chunks[0], (2 * k + 1,)), meta=np.empty((0, 0)),
        )
        (values,) = executor.compute(packed, label=label)
        return values[:, :k].astype(np.int64), values[:, k : 2 * k], values[:, -1]

    def apply(self, v: np.ndarray, axis: int, executor: Executor) -> np.ndarray:
        """Kernel-vector product: ``K v`` (``axis=1``, v over spots) or ``K^T v`` (``axis=0``, v over cells)."""
        v = np.asarray(v, dtype=np.float64)
        if axis == 1:
            out = self.blocks.map_blocks(_apply_rows, v, self.eps, self.log_domain, dtype=np.float64, drop_axis=1,
                                         meta=np.empty(0))
        elif axis == 0:
            vd = da.from_array(v, chunks=(self.blocks.chunks[0],))
            out = da.map_blocks(_apply_columns, self.blocks, vd[:, None], self.eps, self.log_domain, dtype=np.float64,
                                chunks=((1,) * self.blocks.numblocks[0], (self.shape[1],)),
                                meta=np.empty((0, 0))).sum(axis=0)
        else:
            raise ValueError("axis must be 0 or 1")
        (result,) = executor.compute(out)
        return result

    def close(self) -> None:
        """Remove a temporary Zarr store of the blocks."""
        if self.temporary and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def _gibbs(block: np.ndarray, eps: float, log_domain: bool) -> np.ndarray:
    return np.exp(-np.asarray(block, np.float64) / eps) if log_domain else np.asarray(block, np.float64)


def _apply_rows(block: np.ndarray, v: np.ndarray, eps: float, log_domain: bool) -> np.ndarray:
    return _gibbs(block, eps, log_domain) @ v


def _apply_columns(block: np.ndarray, v: np.ndarray, eps: float, log_domain: bool) -> np.ndarray:
    return (_gibbs(block, eps, log_domain).T @ v[:, 0])[None, :]


def _scaling(g: np.ndarray, eps: float) -> np.ndarray:
    """``b = exp((g - max g)/eps)``: the column scaling up to a constant factor (which cancels)."""
    return np.exp((g - g.max()) / eps)


def _column_marginal_block(block: np.ndarray, p: np.ndarray, g: np.ndarray, eps: float, log_domain: bool) -> np.ndarray:
    out = np.zeros(block.shape[1], dtype=np.float64)
    rows = np.ascontiguousarray(p[:, 0], dtype=np.float64)
    if log_domain:
        _kernels.log_sweep(block, rows, g, eps, out)
    else:
        _kernels.kernel_sweep(block, rows, _scaling(g, eps).astype(np.float32), out)
    return out[None, :]


def _top_k_block(block: np.ndarray, p: np.ndarray, g: np.ndarray, eps: float, log_domain: bool, k: int) -> np.ndarray:
    if log_domain:
        log_score = (g[None, :] - block.astype(np.float64)) / eps
        shift = log_score.max(axis=1, keepdims=True)
        score = np.exp(log_score - shift)
        log_offset = shift[:, 0]
    else:
        b = _scaling(g, eps)
        score = block.astype(np.float64) * b[None, :]
        log_offset = np.full(block.shape[0], g.max() / eps)
    row_sum = score.sum(axis=1)
    top = np.argpartition(-score, k - 1, axis=1)[:, :k] if k < score.shape[1] else np.tile(np.arange(k), (score.shape[0], 1))
    top_score = np.take_along_axis(score, top, axis=1)
    order = np.argsort(-top_score, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    probability = np.take_along_axis(top_score, order, axis=1) / row_sum[:, None]
    f = eps * (np.log(p[:, 0]) - np.log(row_sum) - log_offset)
    return np.concatenate([top.astype(np.float64), probability, f[:, None]], axis=1)


def _block_stats(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    """Largest finite cost, number of NaN rows (constant cells) and the first such global row."""
    nan_rows = np.flatnonzero(np.isnan(block).any(axis=1))
    finite_max = np.nanmax(block) if nan_rows.size < block.shape[0] else -np.inf
    start = block_info[0]["array-location"][0][0] if block_info else 0
    first = start + nan_rows[0] if nan_rows.size else -1
    return np.array([[finite_max, nan_rows.size, first]], dtype=np.float64)


def _store_block(block: np.ndarray, path: str, block_info: dict | None = None) -> np.ndarray:
    import zarr

    (start, stop), _ = block_info[0]["array-location"]
    zarr.open_array(path, mode="r+")[start:stop] = block
    return _block_stats(block, block_info)


def _exp_stored_block(path: str, start: int, stop: int, eps: float) -> None:
    import zarr

    array = zarr.open_array(path, mode="r+")
    values = array[start:stop]
    array[start:stop] = _to_kernel(values, eps)


def _to_kernel(cost: np.ndarray, eps: float) -> np.ndarray:
    """``exp(-D/eps)`` in place, float32."""
    np.multiply(cost, np.float32(-1.0 / eps), out=cost)
    return np.exp(cost, out=cost)


def _stats_from(stats: np.ndarray) -> float:
    n_bad = int(stats[:, 1].sum())
    if n_bad:
        first = int(stats[stats[:, 2] >= 0, 2].min())
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


def build_kernel(
    cost: da.Array,
    executor: Executor,
    *,
    lam: float | None = 0.05,
    eps: float | None = None,
    log_domain: bool | Literal["auto"] = "auto",
    storage: Storage = "memory",
    path: str | Path | None = None,
) -> Kernel:
    """Materialise the kernel from lazy cost blocks, in worker memory or in Zarr.

    Two passes: the first computes ``D`` blockwise and its maximum (``eps = lam * max D``), the
    second turns ``D`` into ``K = exp(-D/eps)`` in place (skipped in the log domain, which keeps
    ``D``).  Memory holds one copy of the blocks at a time.

    Parameters
    ----------
    cost : dask.array.Array
        Lazy ``(n_cells, n_spots)`` float32 cost ``D``, chunked along rows.
    executor : Executor
    lam : float
        Relative regularisation, ``eps = lam * max D`` (used when ``eps`` is None).
    eps : float, optional
        Absolute regularisation; overrides ``lam``.
    log_domain : bool or "auto"
        Keep ``D`` and iterate in the log domain; ``"auto"`` does so when
        ``eps / max D < LOG_DOMAIN_BELOW_LAM``.
    storage : {"memory", "zarr"}
        Persist blocks in worker memory, or write them to a Zarr store streamed each iteration.
    path : path, optional
        Zarr store for ``storage="zarr"`` (default: a temporary directory, removed by
        :meth:`Kernel.close`).  On a multi-machine cluster it must be on storage every worker reads.

    Returns
    -------
    Kernel
    """
    if storage == "memory":
        cost_blocks, max_cost = _materialize_in_memory(cost, executor)
        eps_value = _resolve_eps(max_cost, lam, eps)
        use_log = _choose_domain(log_domain, eps_value, max_cost)
        blocks = _kernel_in_memory(cost_blocks, None if use_log else eps_value, executor)
        return Kernel(blocks=blocks, eps=eps_value, log_domain=use_log, max_cost=max_cost, storage="memory")
    if storage != "zarr":
        raise SSAInputError(f"kernel storage must be 'memory' or 'zarr', got {storage!r}")
    import zarr

    temporary = path is None
    store = Path(tempfile.mkdtemp(prefix="ssa-kernel-")) / "kernel.zarr" if temporary else Path(path)
    block_rows = cost.chunks[0][0]
    zarr.create_array(str(store), shape=cost.shape, chunks=(block_rows, cost.shape[1]), dtype="float32",
                      compressors=None, overwrite=True)
    try:
        stats = cost.map_blocks(_store_block, str(store), dtype=np.float64,
                                chunks=((1,) * cost.numblocks[0], (3,)), meta=np.empty((0, 0)))
        (values,) = executor.compute(stats, label="cost -> zarr")
        max_cost = _stats_from(values)
        eps_value = _resolve_eps(max_cost, lam, eps)
        use_log = _choose_domain(log_domain, eps_value, max_cost)
        if not use_log:
            bounds = np.cumsum((0,) + cost.chunks[0])
            tasks = [dask.delayed(_exp_stored_block)(str(store), int(a), int(b), eps_value) for a, b in zip(bounds[:-1], bounds[1:])]
            executor.compute(*tasks, label="kernel exp")
    except BaseException:
        shutil.rmtree(store.parent if temporary else store, ignore_errors=True)
        raise
    blocks = da.from_zarr(str(store))
    kernel_path = store.parent if temporary else store
    log.info("kernel blocks in Zarr at %s (%.2f GB)", store, cost.size * 4 / 1e9)
    return Kernel(blocks=blocks, eps=eps_value, log_domain=use_log, max_cost=max_cost, storage="zarr",
                  path=kernel_path, temporary=temporary)


def _choose_domain(log_domain: bool | str, eps: float, max_cost: float) -> bool:
    if log_domain == "auto":
        return bool(eps / max_cost < LOG_DOMAIN_BELOW_LAM) if max_cost > 0 else False
    return bool(log_domain)


def _materialize_in_memory(cost: da.Array, executor: Executor) -> tuple[da.Array | list[np.ndarray], float]:
    """Cost blocks in memory and ``max D``: persisted on the cluster, or a list of local arrays."""
    if executor.distributed:
        blocks = executor.persist(cost, label="cost blocks")
        stats = blocks.map_blocks(_block_stats, dtype=np.float64, chunks=((1,) * blocks.numblocks[0], (3,)),
                                  meta=np.empty((0, 0)))
        (values,) = executor.compute(stats)
        return blocks, _stats_from(values)
    arrays = list(executor.compute(*cost.to_delayed().ravel(), label="cost blocks"))
    values = np.concatenate([_block_stats(a) for a in arrays])
    starts = np.cumsum((0,) + cost.chunks[0])[:-1]
    values[:, 2] = np.where(values[:, 2] >= 0, values[:, 2] + starts, -1)
    return arrays, _stats_from(values)


def _cost_to_kernel(cost: np.ndarray, eps: float) -> np.ndarray:
    return _to_kernel(cost.copy(), eps)


def _kernel_in_memory(blocks: da.Array | list[np.ndarray], eps: float | None, executor: Executor) -> da.Array:
    """Turn in-memory cost blocks into kernel blocks (``eps=None`` keeps the cost, log domain)."""
    if executor.distributed:
        if eps is None:
            return blocks
        # A new collection persisted from a graph: each cost block is released once its kernel block
        # exists, and a lost kernel block is recomputed from lineage.
        return executor.persist(blocks.map_blocks(_cost_to_kernel, eps, dtype=np.float32), label="kernel exp")
    if eps is not None:
        with ThreadPoolExecutor(max_workers=executor.n_threads()) as pool:
            list(pool.map(lambda a: _to_kernel(a, eps), blocks))  # in place: these arrays are ours alone
    return da.concatenate([da.from_array(a, chunks=a.shape, name=False) for a in blocks], axis=0)


def kernel_from_array(
    K: np.ndarray | da.Array, *, eps: float, block_rows: int | None = None, log_domain: bool = False,
    max_cost: float | None = None,
) -> Kernel:
    """Wrap a given kernel (or cost, ``log_domain=True``) matrix as a :class:`Kernel`.

    For tests, benchmarks and users who build their own kernel.

    Parameters
    ----------
    K : (n, S) array
        ``exp(-D/eps)``, or ``D`` when ``log_domain``.
    eps : float
        Entropic regularisation the kernel was made with.
    block_rows : int, optional
        Rows per block (default: one block per 4096 rows).
    log_domain : bool
        Whether ``K`` holds the cost ``D``.
    max_cost : float, optional
        ``max D`` (recovered from ``K`` when omitted).
    """
    array = K if isinstance(K, da.Array) else da.from_array(np.asarray(K, dtype=np.float32), chunks=(block_rows or 4096, K.shape[1]), name=False)
    if block_rows is not None:
        array = array.rechunk((block_rows, K.shape[1]))
    array = array.astype(np.float32)
    if max_cost is None:
        (extreme,) = dask.compute(array.max() if log_domain else array.min())
        max_cost = float(extreme) if log_domain else float(-eps * np.log(max(float(extreme), np.finfo(np.float64).tiny)))
    return Kernel(blocks=array, eps=float(eps), log_domain=log_domain, max_cost=max_cost)
