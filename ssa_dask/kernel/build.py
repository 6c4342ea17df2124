"""Building the kernel: lazy cost blocks -> ``eps`` -> kernel blocks in memory or in a kernel store.

Two passes over the cost: the first computes ``D`` blockwise and its maximum (``eps = lam * max D``),
the second turns ``D`` into ``K = exp(-D/eps)`` (skipped in the log domain, which keeps ``D``).
In memory the blocks are computed from the task graph (never scattered); on disk every chunk is
written atomically and the second pass is idempotent (see :mod:`ssa_dask.kernel.store`), so task
retries and preemption are harmless.

A float16 or bfloat16 kernel (:mod:`ssa_dask.kernel.precision`) never holds a float32 copy of the
cost: the first pass only reduces each block to its statistics, and the second recomputes the
cost block and stores its row-scaled 16-bit kernel, so memory or disk peaks at the 16-bit kernel
(at the price of computing the cost twice).  The log domain keeps float32 costs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np

from ssa_dask.kernel._block_math import block_stats, cost_to_kernel, to_kernel
from ssa_dask.cluster import Executor
from ssa_dask.errors import SSAInputError
from ssa_dask.kernel.core import Kernel
from ssa_dask.kernel.precision import HALF_DTYPES, ENTRY_BYTES, check_kernel_dtype, choose_kernel_dtype, \
    half_rows_from_cost, half_rows_from_kernel
from ssa_dask.kernel.storage import DiskBlocks, MemoryBlocks, Storage
from ssa_dask.kernel.store import COST_ARRAY, KernelStore, StoredBlock, StoredHalfBlock, local_directory

log = logging.getLogger(__name__)

#: Below this relative regularisation ``lam = eps / max D`` the log domain is chosen automatically:
#: ``exp(-1/lam)`` and the scalings ``exp(g/eps)`` leave the safe float32 range.
LOG_DOMAIN_BELOW_LAM = 0.02
#: With ``kernel_dtype="auto"``, a float32 kernel in memory may take at most this share of the
#: workers' memory before float16 is chosen (the share ``align`` keeps the kernel in memory below).
MEMORY_SHARE_FOR_KERNEL = 0.5


def _store_block(block: np.ndarray, targets: list[StoredBlock], block_info: dict | None = None) -> np.ndarray:
    """Write a cost block to its chunk of the store (atomically; a retry writes the same bytes); its stats row."""
    targets[block_info[0]["chunk-location"][0]].write(block)
    return _block_stats_row(block)


def _block_stats_row(block: np.ndarray) -> np.ndarray:
    """:func:`block_stats` of a cost block as a one-row chunk of the stats array."""
    return block_stats(block)[None, :]


def _store_half_block(block: np.ndarray, targets: list[StoredHalfBlock], eps: float,
                      block_info: dict | None = None) -> np.ndarray:
    """Write the 16-bit kernel of a cost block to its chunks of the store (atomically, idempotent)."""
    target = targets[block_info[0]["chunk-location"][0]]
    target.write(half_rows_from_cost(block, eps, target.dtype))
    return np.zeros((1, 1))


def _cost_stats(cost: da.Array, executor: Executor, bounds: np.ndarray,
                func: Callable[..., np.ndarray] = _block_stats_row, *args: Any, label: str = "cost statistics") -> float:
    """``max D`` of a lazy cost, from one pass of ``func`` (per-block stats, perhaps storing the block)."""
    stats_array = cost.map_blocks(func, *args, dtype=np.float64, chunks=((1,) * cost.numblocks[0], (3,)),
                                  meta=np.empty((0, 0)))
    (stats,) = executor.compute(stats_array, label=label)
    return _max_cost(stats, bounds)


def _exp_stored_block(cost: StoredBlock, kernel: StoredBlock, eps: float) -> None:
    """Turn a stored cost chunk into its kernel chunk; idempotent, so a retried task is harmless.

    The kernel chunk is written beside its name and renamed into place before the cost chunk is
    removed: a task that runs again finds the kernel chunk complete and only tidies up.
    """
    if not kernel.is_complete():
        kernel.write(to_kernel(np.array(cost.load()), eps))
    cost.remove()


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


def check_dtype_domain(kernel_dtype: str, log_domain: bool | str, lam: float | None, eps: float | None,
                       use_log: bool | None = None) -> None:
    """SSAInputError for a float16/bfloat16 kernel in the log domain (known now, or after ``eps``: ``use_log``)."""
    if kernel_dtype not in HALF_DTYPES:
        return
    known = use_log if use_log is not None else (
        log_domain is True or (log_domain == "auto" and eps is None and lam is not None and lam < LOG_DOMAIN_BELOW_LAM))
    if known:
        raise SSAInputError(
            f"kernel_dtype={kernel_dtype!r} stores the kernel exp(-D/eps), but this run iterates in the log domain "
            f"(log_domain={log_domain!r}, lam below {LOG_DOMAIN_BELOW_LAM} or log_domain=True), which keeps the "
            "float32 cost; use kernel_dtype='float32' (or 'auto'), or a larger lam in the kernel domain"
        )


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
    kernel_dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32",
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
        Hold blocks in worker memory (:class:`~ssa_dask.kernel.storage.MemoryBlocks`), or in a
        kernel store on disk streamed each iteration (:class:`~ssa_dask.kernel.storage.DiskBlocks`).
    path : path, optional
        Directory in which the kernel store of ``storage="zarr"`` is created (default: the system's
        temporary directory); :meth:`Kernel.close` removes the store.  On a multi-machine cluster it
        must be on a file system every worker mounts; URLs are refused.
    checkpoint : str, optional
        Checkpoint file of the run: the store is named after it and kept when the run is cut off, and
        a complete store of the same ``fingerprint`` is reused instead of rebuilt.
    fingerprint : str, optional
        Identity of the problem (data, genes, regularisation) that a kept store must match.
    kernel_dtype : {"float32", "float16", "bfloat16", "auto"}
        Format of the stored kernel entries (see :mod:`ssa_dask.kernel.precision`): 16-bit formats
        halve memory and the bytes read per iteration.  ``"auto"`` picks float16 when a float32
        kernel would exceed ``MEMORY_SHARE_FOR_KERNEL`` of the executor's memory but a float16 one
        would not (memory storage, kernel domain), else float32.  float16/bfloat16 in the log
        domain raise :class:`SSAInputError`.

    Returns
    -------
    Kernel
    """
    requested = check_kernel_dtype(kernel_dtype)
    check_dtype_domain(requested, log_domain, lam, eps)
    bounds = np.cumsum((0,) + cost.chunks[0])
    n_spots = int(cost.shape[1])
    dtype = requested
    if requested == "auto":
        dtype = choose_kernel_dtype("auto", cost.size, MEMORY_SHARE_FOR_KERNEL * executor.memory_bytes()) \
            if storage == "memory" else "float32"
        log.info("kernel_dtype auto: %s", dtype)
    if dtype in HALF_DTYPES:
        kernel = _build_half(cost, executor, dtype, lam=lam, eps=eps, log_domain=log_domain, storage=storage,
                             path=path, checkpoint=checkpoint, fingerprint=fingerprint, refuse_log=requested != "auto")
        if kernel is not None:
            return kernel
        log.info("kernel_dtype auto: the log domain keeps float32")
    if storage == "memory":
        blocks = executor.materialize_blocks(cost, label="cost blocks")
        stats = np.asarray(executor.map(block_stats, blocks))
        max_cost = _max_cost(stats, bounds)
        eps_value = _resolve_eps(max_cost, lam, eps)
        use_log = _choose_domain(log_domain, eps_value, max_cost)
        if not use_log:
            if executor.distributed:
                # New futures from the graph: each cost block is released once its kernel block exists,
                # and a lost kernel block is recomputed from lineage.
                blocks = executor.submit_map(cost_to_kernel, blocks, eps=eps_value)
            else:
                executor.map(to_kernel, blocks, eps=eps_value)  # in place: these arrays are ours alone
        return Kernel(MemoryBlocks(blocks, bounds, n_spots), eps=eps_value, log_domain=use_log, max_cost=max_cost)
    if storage != "zarr":
        raise SSAInputError(f"kernel storage must be 'memory' or 'zarr', got {storage!r}")
    parent = local_directory(path, "kernel_path")
    if checkpoint is not None and fingerprint is not None:
        kept = _kept_store(parent, checkpoint, fingerprint, "float32", bounds, n_spots)
        if kept is not None:
            return kept
    store = KernelStore.create(parent, cost.shape, bounds, checkpoint=checkpoint)
    try:
        cost_targets = store.blocks(COST_ARRAY)
        max_cost = _cost_stats(cost, executor, bounds, _store_block, cost_targets, label="cost -> kernel store")
        eps_value = _resolve_eps(max_cost, lam, eps)
        use_log = _choose_domain(log_domain, eps_value, max_cost)
        if use_log:
            blocks = cost_targets
        else:
            blocks = store.kernel_blocks()
            executor.map(_exp_stored_block, cost_targets, blocks, eps=eps_value)
        store.mark_complete({"fingerprint": fingerprint, "eps": eps_value, "max_cost": max_cost, "log_domain": use_log})
    except BaseException:
        store.remove()
        raise
    log.info("kernel blocks in %s (%.2f GB)", store.root, cost.size * 4 / 1e9)
    return Kernel(DiskBlocks(blocks, bounds, n_spots, store), eps=eps_value, log_domain=use_log, max_cost=max_cost)


def _kept_store(parent: Path | None, checkpoint: str, fingerprint: str, dtype: str, bounds: np.ndarray,
                n_spots: int) -> Kernel | None:
    """The kernel of a complete store kept for ``checkpoint`` with this fingerprint and dtype, or None."""
    kept = KernelStore.open_complete(parent, checkpoint, fingerprint)
    if kept is None:
        return None
    store, manifest = kept
    if store.kernel_dtype != dtype:
        log.info("kernel store %s holds a %s kernel, this run asks for %s; rebuilding it", store.root,
                 store.kernel_dtype, dtype)
        return None
    log.info("reusing the complete kernel store %s of the checkpointed run", store.root)
    blocks = store.blocks(COST_ARRAY) if manifest["log_domain"] else store.kernel_blocks()
    return Kernel(DiskBlocks(blocks, bounds, n_spots, store, reused=True, dtype=dtype), eps=manifest["eps"],
                  log_domain=manifest["log_domain"], max_cost=manifest["max_cost"])


def _build_half(cost: da.Array, executor: Executor, dtype: str, *, lam: float | None, eps: float | None,
                log_domain: bool | str, storage: str, path: str | Path | None, checkpoint: str | None,
                fingerprint: str | None, refuse_log: bool) -> Kernel | None:
    """A float16/bfloat16 kernel: a stats pass over the cost, then the cost recomputed into 16-bit blocks.

    Returns None when the log domain is chosen and ``refuse_log`` is False (``"auto"`` falls back
    to float32); raises :class:`SSAInputError` when it is chosen and ``refuse_log``.
    """
    bounds = np.cumsum((0,) + cost.chunks[0])
    n_spots = int(cost.shape[1])
    if storage not in ("memory", "zarr"):
        raise SSAInputError(f"kernel storage must be 'memory' or 'zarr', got {storage!r}")
    parent = local_directory(path, "kernel_path") if storage == "zarr" else None
    if storage == "zarr" and checkpoint is not None and fingerprint is not None:
        kept = _kept_store(parent, checkpoint, fingerprint, dtype, bounds, n_spots)
        if kept is not None:
            return kept
    max_cost = _cost_stats(cost, executor, bounds)
    eps_value = _resolve_eps(max_cost, lam, eps)
    use_log = _choose_domain(log_domain, eps_value, max_cost)
    if use_log:
        if refuse_log:
            check_dtype_domain(dtype, log_domain, lam, eps, use_log=True)
        return None
    if storage == "memory":
        encoded = cost.map_blocks(half_rows_from_cost, eps_value, dtype, dtype=np.uint16, meta=np.empty((0, 0), np.uint16))
        blocks = executor.materialize_blocks(encoded, label=f"{dtype} kernel blocks")
        log.info("kernel blocks in memory as %s (%.2f GB)", dtype, cost.size * ENTRY_BYTES[dtype] / 1e9)
        return Kernel(MemoryBlocks(blocks, bounds, n_spots, dtype=dtype), eps=eps_value, log_domain=False,
                      max_cost=max_cost)
    store = KernelStore.create(parent, cost.shape, bounds, checkpoint=checkpoint, kernel_dtype=dtype)
    try:
        blocks = store.kernel_blocks()
        written = cost.map_blocks(_store_half_block, blocks, eps_value, dtype=np.float64,
                                  chunks=((1,) * cost.numblocks[0], (1,)), meta=np.empty((0, 0)))
        executor.compute(written, label=f"{dtype} kernel -> kernel store")
        store.mark_complete({"fingerprint": fingerprint, "eps": eps_value, "max_cost": max_cost, "log_domain": False})
    except BaseException:
        store.remove()
        raise
    log.info("kernel blocks in %s as %s (%.2f GB)", store.root, dtype, cost.size * ENTRY_BYTES[dtype] / 1e9)
    return Kernel(DiskBlocks(blocks, bounds, n_spots, store, dtype=dtype), eps=eps_value, log_domain=False,
                  max_cost=max_cost)


def kernel_from_array(
    K: np.ndarray, *, eps: float, block_rows: int | None = None, log_domain: bool = False,
    max_cost: float | None = None, executor: Executor | None = None,
    kernel_dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32",
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
    kernel_dtype : {"float32", "float16", "bfloat16", "auto"}
        Format of the stored entries (:mod:`ssa_dask.kernel.precision`; 16-bit rows are scaled by
        their maximum); ``"auto"`` as in :func:`build_kernel` (float32 in the log domain), with
        the executor's memory (this machine's by default).  float16/bfloat16 with ``log_domain``
        raise :class:`SSAInputError`.
    """
    requested = check_kernel_dtype(kernel_dtype)
    check_dtype_domain(requested, log_domain, None, eps)
    dtype = requested
    if requested == "auto":
        dtype = "float32" if log_domain else choose_kernel_dtype(
            "auto", int(np.size(K)), MEMORY_SHARE_FOR_KERNEL * (executor or Executor()).memory_bytes())
    values = np.ascontiguousarray(K, dtype=np.float32)
    rows = block_rows or 4096
    bounds = np.append(np.arange(0, values.shape[0], rows), values.shape[0])
    if max_cost is None:
        max_cost = float(values.max()) if log_domain else float(-eps * np.log(max(float(values.min()), np.finfo(np.float64).tiny)))
    if executor is not None and executor.distributed:
        chunked = da.from_array(values, chunks=(rows, values.shape[1]), name=False)
        if dtype in HALF_DTYPES:
            chunked = chunked.map_blocks(half_rows_from_kernel, dtype, dtype=np.uint16, meta=np.empty((0, 0), np.uint16))
        blocks = executor.materialize_blocks(chunked)
    else:
        blocks = [values[a:b] if dtype == "float32" else half_rows_from_kernel(values[a:b], dtype)
                  for a, b in zip(bounds[:-1], bounds[1:])]
    return Kernel(MemoryBlocks(blocks, bounds, int(values.shape[1]), dtype=dtype), eps=float(eps),
                  log_domain=log_domain, max_cost=max_cost)
