"""The SSA pipeline, orchestration only: read, select genes, z-score, cost, kernel, Sinkhorn, assign."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

from ssa_dask.assign import assignment_dataset
from ssa_dask.cluster import Executor, connect
from ssa_dask.cost import cost_blocks, lazy_pearson_cost
from ssa_dask.errors import SSAInputError
from ssa_dask.genes import select_genes
from ssa_dask.io import ExpressionMatrix, read_expression
from ssa_dask.kernel import build_kernel
from ssa_dask.kernel_store import local_directory
from ssa_dask.sinkhorn import DEFAULT_MAX_ITER, DEFAULT_TOL, Checkpoint, sinkhorn
from ssa_dask.standardize import MatrixSummary, summarize

log = logging.getLogger(__name__)

#: Target size of one row block of the kernel (and of one densified block of cells).
TARGET_BLOCK_BYTES = 128 * 2**20
#: With ``kernel_storage="auto"``, the kernel stays in memory while it takes at most this share of
#: the workers' memory; beyond it the blocks go to Zarr and are streamed.
MEMORY_SHARE_FOR_KERNEL = 0.5


def align(
    sc: Any,
    spots: Any,
    *,
    n_genes: int = 5000,
    lam: float = 0.05,
    eps: float | None = None,
    marginals: Literal["total", "uniform"] = "total",
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    log_domain: bool | Literal["auto"] = "auto",
    top_k: int = 1,
    block_rows: int | None = None,
    kernel_storage: Literal["auto", "memory", "zarr"] = "auto",
    kernel_path: str | None = None,
    memory_budget: int | None = None,
    init_g: np.ndarray | None = None,
    checkpoint: str | None = None,
    client: Any = None,
    sc_layer: str | None = None,
    spots_layer: str | None = None,
    gene_key: str | None = None,
    log1p: bool = False,
    progress: bool = False,
) -> xr.Dataset:
    """Align single cells to spatial spots with SSA.

    The method: keep the ``n_genes`` highest-variance genes of ``sc`` that the spots also have,
    z-score every gene in each matrix separately, take ``D = 1 - |rho|`` from the Pearson
    correlation of every cell with every spot over those genes, solve entropic OT with Sinkhorn
    (``p``/``q`` = normalised per-cell/per-spot totals, ``K = exp(-D/eps)``, ``eps = lam * max D``)
    and send each cell to the spot with the largest plan entry.

    ``lam`` is the *relative* entropic regularisation.  The SSA paper prints the kernel as
    ``exp(-lam * D / max D)``; read literally with ``lam = 0.05`` that kernel is nearly flat and the
    mapping close to random, so ``lam`` is read as ``eps / max D``.  Pass ``eps`` to set the
    absolute value instead.

    Parameters
    ----------
    sc, spots
        Cells x genes and spots x genes: AnnData, path to ``.h5ad`` / AnnData-Zarr / Zarr array,
        NumPy array or SciPy sparse matrix (see :func:`ssa_dask.io.read_expression`).
    n_genes : int
        Top-variance scRNA genes to start from.
    lam : float
        Relative regularisation, ``eps = lam * max D``.
    eps : float, optional
        Absolute regularisation (overrides ``lam``).
    marginals : {"total", "uniform"}
        Masses ``p``, ``q``: normalised per-row totals (the method), or uniform.
    tol : float
        Stop when the column-marginal L1 error is below ``tol`` (rows match exactly).
    max_iter : int
        Iteration cap (a ``ConvergenceWarning`` is raised when reached).
    log_domain : bool or "auto"
        Stabilised log-domain iterations; ``"auto"`` uses them when ``eps / max D < 0.02``.
    top_k : int
        Number of best spots reported per cell.
    block_rows : int, optional
        Cells per block (default: blocks of about 128 MiB).
    kernel_storage : {"auto", "memory", "zarr"}
        Keep kernel blocks in worker memory, or in a Zarr store streamed every iteration;
        ``"auto"`` picks memory while the kernel takes at most half of ``memory_budget``.
    kernel_path : str, optional
        Directory for the temporary Zarr store of the kernel blocks (default: the system's temporary
        directory); the store is removed when the run ends.  Use fast local or shared scratch.
    memory_budget : int, optional
        Bytes the workers may use (default: the cluster's memory, or this machine's available memory).
    init_g : (n_spots,) array, optional
        Warm-start column potential (e.g. ``result.attrs["column_potential"]`` of an earlier run).
    checkpoint : str, optional
        ``.npz`` file where the Sinkhorn state is saved every 10 iterations; when it exists the run
        resumes from it.  Removed after a successful run.
    client
        ``None``: local threads; ``"local"``: an embedded LocalCluster; an address; a
        ``distributed.Client``; ``"slurm"`` / ``"kubernetes"`` (see :func:`ssa_dask.cluster.connect`).
    sc_layer, spots_layer : str, optional
        AnnData layers to use instead of ``X``.
    gene_key : str, optional
        ``var`` column with gene names (both inputs).
    log1p : bool
        Apply ``log(1 + x)`` to both inputs first.
    progress : bool
        Show progress bars.

    Returns
    -------
    xarray.Dataset
        Over ``cell``: ``spot`` (index), ``spot_name``, ``probability``, ``spot_x``/``spot_y`` when the
        spots have coordinates, ``potential`` (row potential ``f``); over ``(cell, rank)``:
        ``top_spot``, ``top_probability``; coordinate ``gene`` with the genes used; attrs with the run
        record (``lam``, ``eps``, ``n_iter``, ``marginal_error``, ``converged``, ``log_domain``,
        ``kernel_storage``, ``column_potential``).

    Raises
    ------
    SSAInputError
        For input that cannot be aligned; the message names the problem.
    """
    if top_k < 1:
        raise SSAInputError(f"top_k must be at least 1, got {top_k}")
    if marginals not in ("total", "uniform"):
        raise SSAInputError(f"marginals must be 'total' or 'uniform', got {marginals!r}")
    _check_scratch(kernel_path, checkpoint, block_rows)
    checkpoint = str(Path(checkpoint).expanduser().resolve()) if checkpoint else None
    cells = read_expression(sc, layer=sc_layer, gene_key=gene_key, log1p=log1p, role="scRNA")
    spot_matrix = read_expression(spots, layer=spots_layer, gene_key=gene_key, log1p=log1p, role="spots")
    with connect(client, progress=progress) as executor:
        return _align(cells, spot_matrix, executor, n_genes=n_genes, lam=lam, eps=eps, marginals=marginals, tol=tol,
                      max_iter=max_iter, log_domain=log_domain, top_k=top_k, block_rows=block_rows,
                      kernel_storage=kernel_storage, kernel_path=kernel_path, memory_budget=memory_budget,
                      init_g=init_g, checkpoint=checkpoint, progress=progress)


def _align(cells: ExpressionMatrix, spot_matrix: ExpressionMatrix, executor: Executor, *, n_genes, lam, eps, marginals,
           tol, max_iter, log_domain, top_k, block_rows, kernel_storage, kernel_path, memory_budget, init_g,
           checkpoint, progress) -> xr.Dataset:
    n_cells, n_spots = cells.shape[0], spot_matrix.shape[0]
    log.info("scRNA: %d cells x %d genes; spots: %d x %d genes", *cells.shape, *spot_matrix.shape)
    if top_k > n_spots:
        raise SSAInputError(f"top_k={top_k} exceeds the number of spots ({n_spots})")
    cell_summary = summarize(cells.X, executor)
    spot_summary = summarize(spot_matrix.X, executor)
    _check_values(cell_summary, cells, "scRNA", marginals)
    _check_values(spot_summary, spot_matrix, "spots", marginals)

    selection = select_genes(cells.genes, cell_summary.variance, spot_matrix.genes, spot_summary.variance, n_genes)
    genes = selection.genes
    log.info("using %d genes (%d top-variance genes missing in the spots, %d constant)", len(genes),
             len(selection.missing_in_spots), len(selection.constant))
    cell_cols = cells.genes.get_indexer(genes)
    spot_cols = spot_matrix.genes.get_indexer(genes)
    cost = lazy_pearson_cost(cell_summary.mean[cell_cols], cell_summary.std[cell_cols],
                             spot_matrix.select_genes(genes).X, spot_summary.mean[spot_cols], spot_summary.std[spot_cols])

    rows = block_rows or default_block_rows(n_cells, n_spots, len(genes), executor.n_threads(), cells.X.chunks[0][0])
    X = cells.select_genes(genes).rechunk_rows(rows).X
    storage = _choose_storage(kernel_storage, n_cells * n_spots * 4, memory_budget or executor.memory_bytes())
    log.info("kernel %d x %d float32 (%.2f GB) in %s, %d blocks of %d cells", n_cells, n_spots,
             n_cells * n_spots * 4 / 1e9, storage, math.ceil(n_cells / rows), rows)
    fingerprint = _fingerprint(cell_summary, spot_summary, genes, lam, eps, log_domain, rows)
    kernel = build_kernel(cost_blocks(X, cost, n_spots), executor, lam=None if eps is not None else lam, eps=eps,
                          log_domain=log_domain, storage=storage, path=kernel_path,
                          checkpoint=checkpoint if storage == "zarr" else None, fingerprint=fingerprint)
    finished = False
    try:
        p = kernel.row_vector(_masses(cell_summary.row_totals, marginals), executor)
        q = _masses(spot_summary.row_totals, marginals)
        saver = Checkpoint(checkpoint) if checkpoint else None
        if saver is not None:
            resumed = saver.load(n_spots, kernel.eps)
            init_g = resumed if resumed is not None else init_g
        result = sinkhorn(kernel, p, q, tol=tol, max_iter=max_iter, init_g=init_g, executor=executor, progress=progress,
                          callback=saver)
        if saver is not None and result.converged:
            saver.path.unlink(missing_ok=True)
        top_spot, top_probability, f = kernel.top_k(p, result.g, top_k, executor)
        finished = result.converged
    finally:
        # A checkpointed run that did not finish keeps its kernel store for the resumed run.
        kernel.close(keep_store=checkpoint is not None and not finished)
    attrs = {
        "method": "SSA",
        "lam": kernel.lam,
        "eps": kernel.eps,
        "max_cost": kernel.max_cost,
        "n_iter": result.n_iter,
        "marginal_error": result.marginal_error,
        "converged": int(result.converged),
        "tol": tol,
        "log_domain": int(result.log_domain),
        "marginals": marginals,
        "kernel_storage": storage,
        "kernel_reused": int(kernel.reused),
        "n_genes_requested": n_genes,
        "n_genes_used": len(genes),
        "genes_missing_in_spots": selection.missing_in_spots,
        "genes_constant": selection.constant,
        "sinkhorn_seconds": result.seconds,
        "column_potential": result.g.tolist(),
    }
    ds = assignment_dataset(top_spot, top_probability, cells.names, spot_matrix.names, spot_matrix.coords, f=f, attrs=attrs)
    return ds.assign_coords(gene=np.asarray(genes, dtype=object))


def default_block_rows(n_cells: int, n_spots: int, n_genes: int, n_threads: int, stored_rows: int | None = None) -> int:
    """Cells per block: about ``TARGET_BLOCK_BYTES``, at least one block per thread, and aligned
    with the input's stored row chunks (a multiple or an even split of them), so no block has to
    stitch rows from two stored chunks."""
    by_size = TARGET_BLOCK_BYTES // (4 * max(n_spots, n_genes))
    by_threads = math.ceil(n_cells / max(1, n_threads))
    rows = int(max(1, min(by_size, by_threads, n_cells)))
    if stored_rows and stored_rows < n_cells:
        if rows >= stored_rows:
            rows = stored_rows * (rows // stored_rows)
        else:
            rows = math.ceil(stored_rows / math.ceil(stored_rows / rows))
    return rows


def _choose_storage(requested: str, kernel_bytes: int, budget: int) -> str:
    if requested in ("memory", "zarr"):
        return requested
    if requested != "auto":
        raise SSAInputError(f"kernel_storage must be 'auto', 'memory' or 'zarr', got {requested!r}")
    return "memory" if kernel_bytes <= MEMORY_SHARE_FOR_KERNEL * budget else "zarr"


def _check_scratch(kernel_path: str | None, checkpoint: str | None, block_rows: int | None) -> None:
    """Refuse scratch locations and blockings that cannot work, before anything is read or started."""
    local_directory(kernel_path, "kernel_path")
    if checkpoint is not None:
        local_directory(Path(checkpoint).parent, "checkpoint directory")
    if block_rows is not None and block_rows < 1:
        raise SSAInputError(f"block_rows must be at least 1, got {block_rows}")


def _fingerprint(cells: MatrixSummary, spots: MatrixSummary, genes: pd.Index, lam: float, eps: float | None,
                 log_domain: Any, rows: int) -> str:
    """Identity of the kernel a run builds: the data (through their exact per-row and per-gene
    sums), the genes, the regularisation and the blocking.  A kept kernel store is reused only by a
    run of the same fingerprint."""
    import hashlib

    digest = hashlib.sha256()
    for summary in (cells, spots):
        for values in (summary.row_totals, summary.gene_sum, summary.gene_sumsq):
            digest.update(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    digest.update(repr((list(map(str, genes)), lam, eps, str(log_domain), rows)).encode())
    return digest.hexdigest()


def _masses(totals: np.ndarray, marginals: str) -> np.ndarray:
    if marginals == "uniform":
        return np.full(totals.shape, 1.0 / totals.size)
    return totals / totals.sum()


def _check_values(summary: MatrixSummary, matrix: ExpressionMatrix, role: str, marginals: str) -> None:
    if summary.n_nonfinite:
        raise SSAInputError(f"{role}: {summary.n_nonfinite} NaN or infinite value(s) in the expression matrix")
    if summary.min_value < 0 and marginals == "total":
        raise SSAInputError(
            f"{role}: negative expression values (min {summary.min_value:.3g}); SSA's masses are per-row totals of "
            "non-negative counts or log-counts. Pass unscaled data, or marginals='uniform' for signed input"
        )
    empty = np.flatnonzero(summary.row_totals <= 0) if marginals == "total" else np.flatnonzero(summary.row_totals == 0)
    if empty.size:
        names = list(pd.Index(matrix.names)[empty[:5]])
        raise SSAInputError(f"{role}: {empty.size} row(s) with zero total expression (empty), e.g. {names}; remove them")
