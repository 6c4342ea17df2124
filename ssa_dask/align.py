"""The SSA pipeline, orchestration only: read, select genes, z-score, cost, kernel, Sinkhorn, assign."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr

from ssa_dask.assign import assignment_dataset, spots_over_input
from ssa_dask.cluster import Executor, connect
from ssa_dask.cost import cost_blocks, lazy_pearson_cost
from ssa_dask.errors import SSAInputError
from ssa_dask.genes import select_genes
from ssa_dask.io import ExpressionMatrix, read_expression
from ssa_dask.kernel.build import LOG_DOMAIN_BELOW_LAM, MEMORY_SHARE_FOR_KERNEL, build_kernel, check_dtype_domain
from ssa_dask.kernel.precision import ENTRY_BYTES, check_kernel_dtype, choose_kernel_dtype
from ssa_dask.kernel.multiscale import (DEFAULT_SUPPORT, build_multiscale_kernel, candidate_width, check_sparse_options,
                                       check_support)
from ssa_dask.kernel.store import local_directory
from ssa_dask.progress import SinkhornProgress
from ssa_dask.refine import DEFAULT_ETA, DEFAULT_INNER, check_refine_options, refine_solution, with_refinement
from ssa_dask.sinkhorn import DEFAULT_MAX_ITER, DEFAULT_TOL, Checkpoint, check_iteration_options, sinkhorn
from ssa_dask.standardize import MatrixSummary, summarize

log = logging.getLogger(__name__)

#: Target size of one row block of the kernel (and of one densified block of cells).
TARGET_BLOCK_BYTES = 128 * 2**20


def align(
    sc: Any,
    spots: Any,
    *,
    n_genes: int = 5000,
    lam: float = 0.05,
    eps: float | None = None,
    marginals: Literal["total", "uniform"] = "total",
    spot_mass: str | np.ndarray | None = None,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    log_domain: bool | Literal["auto"] = "auto",
    top_k: int = 1,
    block_rows: int | None = None,
    kernel_storage: Literal["auto", "memory", "zarr"] = "auto",
    kernel_path: str | None = None,
    memory_budget: int | None = None,
    kernel_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto",
    kernel: Literal["dense", "multiscale"] = "dense",
    n_support: int = DEFAULT_SUPPORT,
    init_g: np.ndarray | None = None,
    checkpoint: str | None = None,
    client: Any = None,
    sc_layer: str | None = None,
    spots_layer: str | None = None,
    gene_key: str | None = None,
    log1p: bool = False,
    drop_empty: bool = False,
    progress: bool = False,
    refine: int | Literal["auto"] | None = None,
    refine_eta: float = DEFAULT_ETA,
    refine_inner: int = DEFAULT_INNER,
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
    spot_mass : str or (n_spots,) array, optional
        Spot capacities ``q`` instead of ``marginals``: a column of the spots' ``obs`` (e.g.
        ``"n_cells"``, cells per spot from nuclei segmentation, as CytoSPACE takes them) or an
        array over the input spots; normalised to sum 1.  Totals suit spots that are *sums* of
        their cells (UMI counts of a capture spot grow with its cells); spots that are *means* of
        their cells (binned imaging data, the paper's semi-simulation) have totals that do not grow
        with their cells, and the number of cells is the better capacity.
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
        With ``kernel_storage="auto"`` (the kernel stays in memory while it takes at most
        ``MEMORY_SHARE_FOR_KERNEL`` of the budget, else it goes to Zarr).
    kernel_dtype : {"auto", "float32", "float16", "bfloat16"}
        Format of the stored kernel entries (:mod:`ssa_dask.kernel.precision`): 16-bit rows, each
        scaled to a maximum of 1, halve the kernel's memory and the bytes read per iteration;
        accumulation stays float32/float64.  ``"auto"``: float16 when a float32 kernel would not fit
        in memory (see ``memory_budget``) but a float16 one would and the storage may be memory,
        else float32; always float32 in the log domain.  float16/bfloat16 in the log domain are
        refused.  The choice is recorded in the attrs (``kernel_dtype``).
    kernel : {"dense", "multiscale"}
        The dense kernel (exact), or a sparse one for slides too large for it: each cell keeps its
        ``n_support`` nearest spots (found through k-means clusters of the spots, exact costs) and
        a far-field value for the others (:mod:`ssa_dask.kernel.multiscale`; kernel domain, in
        memory; ``eps`` from ``max D`` on a sample of cells).  The sparse plan is checked on that
        sample against the exact kernel; an :class:`~ssa_dask.kernel.multiscale.ApproximationWarning`
        says when it is too far, and ``attrs`` record the check.
    n_support : int
        Spots kept per cell by ``kernel="multiscale"``.
    init_g : (n_spots,) array, optional
        Warm-start column potential (e.g. ``ssa_dask.column_potential(result)`` of an earlier run).
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
    drop_empty : bool
        Leave out cells and spots with zero total expression (empty rows) instead of refusing the
        run: they are logged, excluded from the gene statistics and the transport problem, and
        reported unassigned in the result (``assigned`` False, ``spot`` -1, ``spot_name`` "",
        probabilities NaN).  The result still covers every input cell in input order.
    progress : bool
        Show progress bars.
    refine : int or "auto", optional
        Refined mode (:mod:`ssa_dask.refine`): after the SSA solution, this many mirror-descent
        steps on the cost towards plans whose spot profiles match the spots (gene-wise and
        spot-wise cosine), each followed by ``refine_inner`` warm-started Sinkhorn iterations;
        ``"auto"`` stops when the gene-wise cosine of 10 % held-out genes has not risen for 3
        steps (at most 50).  ``None`` (default) is the SSA method unchanged.
    refine_eta : float
        Step size of the refined mode (each step moves the cost by at most ``refine_eta * eps``
        on a fixed sample of cells).
    refine_inner : int
        Sinkhorn iterations after each refine step.

    Returns
    -------
    xarray.Dataset
        Over ``cell``: ``spot`` (index), ``spot_name``, ``probability``, ``spot_x``/``spot_y`` when the
        spots have coordinates, ``potential`` (row potential ``f``); over ``(cell, rank)``:
        ``top_spot``, ``top_probability``; ``assigned`` (False for cells left out by ``drop_empty``);
        coordinate ``gene`` with the genes used (and ``gene_missing_in_spots``, ``gene_constant``);
        over ``spot_id`` (the input spots, named): ``column_potential`` (``g``, NaN for spots dropped
        as empty; read it with :func:`ssa_dask.column_potential`), ``spot_xy``, ``spot_kept``; attrs
        with the run record (JSON scalars: ``lam``, ``eps``, ``n_iter``, ``marginal_error``,
        ``converged``, ``log_domain``, ``kernel_storage``, ``n_cells_dropped``, ``n_spots_dropped``,
        how the inputs were read).  A refined result also holds ``refine_A`` over ``(spot_id, gene)``
        and ``refine_a`` over ``spot_id``: the refined cost is ``D + X A^T - 1 a^T`` with ``X`` the
        cells' values over the genes used (as read), and attrs ``refine_*`` (steps, eta, inner,
        objective per step).  ``spot`` and ``top_spot`` index the rows of the input spot matrix;
        unassigned cells have ``spot`` -1, ``spot_name`` "" and NaN probabilities and coordinates.

    Warnings are logged (logger ``ssa_dask.align``) for degenerate input: a row whose mass exceeds
    ``MASS_WARN_OVER_MEDIAN`` times the median row mass, and cells or spots dropped as empty.

    Raises
    ------
    SSAInputError
        For input that cannot be aligned; the message names the problem.
    """
    if top_k < 1:
        raise SSAInputError(f"top_k must be at least 1, got {top_k}")
    if marginals not in ("total", "uniform"):
        raise SSAInputError(f"marginals must be 'total' or 'uniform', got {marginals!r}")
    check_iteration_options(tol, max_iter)
    check_refine_options(refine, refine_eta, refine_inner)
    _check_scratch(kernel_path, checkpoint, block_rows)
    check_dtype_domain(check_kernel_dtype(kernel_dtype), log_domain, lam if eps is None else None, eps)
    if refine is not None and kernel_dtype not in ("auto", "float32"):
        raise SSAInputError(f"refine needs a float32 kernel (its steps rewrite the kernel's values), got "
                            f"kernel_dtype={kernel_dtype!r}")
    check_sparse_options(kernel, n_support, top_k, log_domain)
    if kernel == "multiscale" and (refine is not None or kernel_dtype not in ("auto", "float32")):
        raise SSAInputError("kernel='multiscale' keeps float32 sparse rows and cannot be refined: use the dense kernel "
                            "for refine or kernel_dtype")
    checkpoint = str(Path(checkpoint).expanduser().resolve()) if checkpoint else None
    cells = read_expression(sc, layer=sc_layer, gene_key=gene_key, log1p=log1p, role="scRNA")
    spot_matrix = read_expression(spots, layer=spots_layer, gene_key=gene_key, log1p=log1p, role="spots")
    capacity = spot_capacity(spot_mass, spot_matrix)
    with connect(client, progress=progress) as executor:
        result = _align(cells, spot_matrix, executor, n_genes=n_genes, lam=lam, eps=eps, marginals=marginals,
                        capacity=capacity, tol=tol,
                        max_iter=max_iter, log_domain=log_domain, top_k=top_k, block_rows=block_rows,
                        kernel_storage=kernel_storage, kernel_path=kernel_path, memory_budget=memory_budget,
                        kernel_dtype=kernel_dtype, kernel_method=kernel, n_support=n_support, init_g=init_g,
                        checkpoint=checkpoint, progress=progress, drop_empty=drop_empty, refine=refine,
                        refine_eta=refine_eta, refine_inner=refine_inner)
    # How the inputs were read, so that open_plan can read them the same way.
    result.attrs.update(log1p=int(log1p), sc_layer=sc_layer or "", spots_layer=spots_layer or "", gene_key=gene_key or "",
                        spot_mass=marginals if spot_mass is None else spot_mass if isinstance(spot_mass, str) else "array")
    return result


def _align(cells: ExpressionMatrix, spot_matrix: ExpressionMatrix, executor: Executor, *, n_genes, lam, eps, marginals,
           capacity=None, tol, max_iter, log_domain, top_k, block_rows, kernel_storage, kernel_path, memory_budget, init_g,
           checkpoint, progress, drop_empty=False, kernel_dtype="auto", kernel_method="dense",
           n_support=DEFAULT_SUPPORT, refine=None, refine_eta=DEFAULT_ETA, refine_inner=DEFAULT_INNER) -> xr.Dataset:
    log.info("scRNA: %d cells x %d genes; spots: %d x %d genes", *cells.shape, *spot_matrix.shape)
    inputs = _checked_inputs(cells, spot_matrix, executor, marginals, drop_empty)
    cells, spot_matrix, cell_summary, spot_summary = inputs.cells, inputs.spots, inputs.cell_summary, inputs.spot_summary
    n_cells, n_spots = cells.shape[0], spot_matrix.shape[0]
    init_g = inputs.kept_spot_values(init_g)
    if top_k > n_spots:
        raise SSAInputError(f"top_k={top_k} exceeds the number of spots ({n_spots})")

    selection = select_genes(cells.genes, cell_summary.variance, spot_matrix.genes, spot_summary.variance, n_genes)
    genes = selection.genes
    log.info("using %d genes (%d top-variance genes missing in the spots, %d constant)", len(genes),
             len(selection.missing_in_spots), len(selection.constant))
    cell_cols = cells.genes.get_indexer(genes)
    spot_cols = spot_matrix.genes.get_indexer(genes)
    cost = lazy_pearson_cost(cell_summary.mean[cell_cols], cell_summary.std[cell_cols],
                             spot_matrix.select_genes(genes).X, spot_summary.mean[spot_cols], spot_summary.std[spot_cols])

    width = n_spots if kernel_method == "dense" else candidate_width(n_support)
    rows = block_rows or default_block_rows(n_cells, width, len(genes), executor.n_threads(), cells.X.chunks[0][0])
    X = cells.select_genes(genes).rechunk_rows(rows).X
    check = None
    if kernel_method == "multiscale":
        storage, dtype = "multiscale", "float32"
        (cost,) = executor.compute(cost)
        kernel, check = build_multiscale_kernel(X, cost, executor, lam=None if eps is not None else lam, eps=eps,
                                                n_support=n_support)
    else:
        budget = memory_budget or executor.memory_bytes()
        dtype = _choose_kernel_dtype("float32" if refine is not None else kernel_dtype, kernel_storage, log_domain, lam,
                                     eps, n_cells * n_spots, budget)
        storage = _choose_storage(kernel_storage, n_cells * n_spots * ENTRY_BYTES[dtype], budget)
        log.info("kernel %d x %d %s (%.2f GB) in %s, %d blocks of %d cells", n_cells, n_spots, dtype,
                 n_cells * n_spots * ENTRY_BYTES[dtype] / 1e9, storage, math.ceil(n_cells / rows), rows)
        fingerprint = _fingerprint(cell_summary, spot_summary, genes, lam, eps, log_domain, rows)
        kernel = build_kernel(cost_blocks(X, cost, n_spots), executor, lam=None if eps is not None else lam, eps=eps,
                              log_domain=log_domain, storage=storage, path=kernel_path,
                              checkpoint=checkpoint if storage == "zarr" else None, fingerprint=fingerprint,
                              kernel_dtype=dtype)
    finished = False
    try:
        p = kernel.row_vector(_masses(cell_summary.row_totals, marginals), executor)
        q = _masses(spot_summary.row_totals, marginals) if capacity is None else _masses(capacity[inputs.kept_spots], "total")
        saver = Checkpoint(checkpoint) if checkpoint else None
        state = saver.resume(n_spots, kernel.eps) if saver is not None else None
        start_iteration = state.iteration if state is not None else 0
        with SinkhornProgress(max_iter, start_iteration=start_iteration, tol=tol, disable=not progress) as bar:
            result = sinkhorn(kernel, p, q, tol=tol, max_iter=max_iter, executor=executor,
                              init_g=state.g if state is not None else init_g, start_iteration=start_iteration,
                              callback=[bar] if saver is None else [bar, saver])
        if saver is not None and result.converged:
            saver.path.unlink(missing_ok=True)
        g = result.g
        if refine is not None:
            refined = refine_solution(kernel, result, p, q, X, spot_matrix.select_genes(genes).X, executor,
                                      cell_stats=(cell_summary.mean[cell_cols], cell_summary.std[cell_cols]),
                                      option=refine, eta=refine_eta, inner=refine_inner, tol=tol)
        top_spot, top_probability, f = kernel.top_k(p, g if refine is None else refined.kernel_g, top_k, executor)
        if refine is not None:
            g = refined.g
            if refined.row_offset is not None:  # what the refined kernel blocks absorbed
                f = f + refined.row_offset
        if check is not None:
            check_support(check, X, cost, kernel, g, executor).warn_if_failed(n_support)
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
        "resumed_from_iteration": result.start_iteration,
        "marginal_error": result.marginal_error,
        "converged": bool(result.converged),
        "tol": tol,
        "log_domain": bool(result.log_domain),
        "marginals": marginals,
        "kernel_storage": storage,
        "kernel_dtype": dtype,
        "kernel_reused": bool(kernel.reused),
        "n_genes_requested": n_genes,
        "n_genes_used": len(genes),
        "sinkhorn_seconds": result.seconds,
        **({"n_support": kernel.storage.n_support, **check.summary()} if check is not None else {}),
    }
    ds = assignment_dataset(top_spot, top_probability, cells.names, spot_matrix.names, spot_matrix.coords, f=f, attrs=attrs,
                            g=g, genes_missing_in_spots=selection.missing_in_spots,
                            genes_constant=selection.constant)
    if refine is not None:
        ds = with_refinement(ds, refined, option=refine, eta=refine_eta, inner=refine_inner)
    return inputs.restore(ds.assign_coords(gene=np.asarray(genes, dtype=object)))


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


def _choose_kernel_dtype(requested: str, storage: str, log_domain: Any, lam: float, eps: float | None, n_entries: int,
                        budget: int) -> str:
    """Resolve ``kernel_dtype="auto"``: float16 only where the kernel may live in memory, the kernel
    domain is certain before the cost is computed, and float32 would not fit in its share of ``budget``."""
    if requested != "auto":
        return requested
    kernel_domain = log_domain is False or (log_domain == "auto" and eps is None and lam >= LOG_DOMAIN_BELOW_LAM)
    if storage == "zarr" or not kernel_domain:
        return "float32"
    dtype = choose_kernel_dtype("auto", n_entries, MEMORY_SHARE_FOR_KERNEL * budget)
    if dtype != "float32":
        log.info("kernel_dtype auto: float16 (a float32 kernel of %.2f GB exceeds %.0f %% of the %.2f GB budget)",
                 n_entries * 4 / 1e9, 100 * MEMORY_SHARE_FOR_KERNEL, budget / 1e9)
    return dtype


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


def spot_capacity(spot_mass: str | np.ndarray | None, spots: ExpressionMatrix) -> np.ndarray | None:
    """The spot capacities named by ``spot_mass`` (an obs column or an array), checked; None for the default.

    Raises
    ------
    SSAInputError
        A missing or non-numeric column, a wrong length, or a capacity that is not finite and positive.
    """
    if spot_mass is None:
        return None
    if isinstance(spot_mass, str):
        obs = spots.obs if spots.obs is not None else pd.DataFrame()
        if spot_mass not in obs.columns:
            raise SSAInputError(f"spots: spot_mass={spot_mass!r} is not a column of the spots' obs "
                                f"(columns: {list(obs.columns)[:10]})")
        values, what = obs[spot_mass], f"obs[{spot_mass!r}]"
    else:
        values, what = spot_mass, "spot_mass"
    try:
        capacity = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise SSAInputError(f"spots: {what} is not numeric") from None
    if capacity.shape != (spots.shape[0],):
        raise SSAInputError(f"spots: {what} has shape {capacity.shape}, expected ({spots.shape[0]},) (one per spot)")
    bad = np.flatnonzero(~np.isfinite(capacity) | (capacity <= 0))
    if bad.size:
        raise SSAInputError(f"spots: {bad.size} spot(s) have a capacity in {what} that is not a positive number (e.g. "
                            f"{list(pd.Index(spots.names)[bad[:5]])}); every spot must be able to receive cells")
    return capacity


def _masses(totals: np.ndarray, marginals: str) -> np.ndarray:
    if marginals == "uniform":
        return np.full(totals.shape, 1.0 / totals.size)
    return totals / totals.sum()


def _check_values(summary: MatrixSummary, matrix: ExpressionMatrix, role: str, marginals: str,
                  drop_empty: bool = False) -> np.ndarray:
    """Refuse non-finite and (with ``marginals="total"``) negative values; return the empty rows.

    Empty rows (zero total expression) raise unless ``drop_empty``; then their indices are returned.
    """
    if summary.n_nonfinite:
        raise SSAInputError(f"{role}: {summary.n_nonfinite} NaN or infinite value(s) in the expression matrix")
    if summary.min_value < 0 and marginals == "total":
        raise SSAInputError(
            f"{role}: negative expression values (min {summary.min_value:.3g}); SSA's masses are per-row totals of "
            "non-negative counts or log-counts. Pass unscaled data, or marginals='uniform' for signed input"
        )
    empty = np.flatnonzero(summary.row_totals <= 0) if marginals == "total" else np.flatnonzero(summary.row_totals == 0)
    if empty.size and not drop_empty:
        names = list(pd.Index(matrix.names)[empty[:5]])
        raise SSAInputError(
            f"{role}: {empty.size} row(s) with zero total expression (empty), e.g. {names}; remove them, or pass "
            "drop_empty=True (CLI: --drop-empty) to leave them out and report them unassigned"
        )
    return empty


#: Fewest rows (cells, spots) SSA accepts: each gene is z-scored over the rows, which needs two.
MIN_ROWS = 2
#: A warning is logged when one row's mass (its total expression, ``marginals="total"``) exceeds
#: this multiple of the median row mass.  Measured on the shared real slides, the largest row total
#: is 1.4x (seqFISH, log-counts) and 6.5x (Xenium, raw counts) the median; library sizes of real
#: cells span about one order of magnitude, so 100x leaves a 15-fold margin over the measured
#: spread while flagging unit mix-ups, stuck values and overflow-sized entries (a single 3e38 entry
#: "converged" in 2 iterations yet changed 35 % of the assignments).
MASS_WARN_OVER_MEDIAN = 100.0


@dataclass(frozen=True)
class _CheckedInputs:
    """The matrices SSA runs on after the value checks, and how to map the result back to the input."""

    cells: ExpressionMatrix
    spots: ExpressionMatrix
    cell_summary: MatrixSummary
    spot_summary: MatrixSummary
    all_cell_names: pd.Index
    kept_cells: np.ndarray
    n_spots_input: int
    kept_spots: np.ndarray
    dropped_spot_names: list[str]

    @property
    def n_cells_dropped(self) -> int:
        """Cells left out of the alignment."""
        return len(self.all_cell_names) - self.kept_cells.size

    def kept_spot_values(self, values: np.ndarray | None) -> np.ndarray | None:
        """A per-spot vector of the input spots (e.g. ``init_g``) restricted to the spots kept."""
        if values is None or self.kept_spots.size == self.n_spots_input:
            return values
        values = np.asarray(values)
        return values[self.kept_spots] if values.shape == (self.n_spots_input,) else values

    def restore(self, ds: xr.Dataset) -> xr.Dataset:
        """The result over every input cell (in input order), spot indices into the input spot matrix."""
        if self.kept_spots.size < self.n_spots_input:
            ds = ds.assign(spot=ds["spot"].copy(data=self.kept_spots[ds["spot"].values]),
                           top_spot=ds["top_spot"].copy(data=self.kept_spots[ds["top_spot"].values]))
        n_all = len(self.all_cell_names)
        assigned = np.zeros(n_all, dtype=bool)
        assigned[self.kept_cells] = True
        if self.kept_cells.size < n_all:
            ds = _expand_cells(ds, self.kept_cells, n_all).assign_coords(cell=np.asarray(self.all_cell_names, dtype=object))
        ds["assigned"] = ("cell", assigned)
        ds["assigned"].attrs["description"] = "False for cells left out as empty (drop_empty): no spot, NaN probability"
        ds.attrs.update(n_cells_dropped=self.n_cells_dropped, n_spots_dropped=self.n_spots_input - self.kept_spots.size)
        return spots_over_input(ds, self.kept_spots, self.n_spots_input, self.dropped_spot_names)


def _checked_inputs(cells: ExpressionMatrix, spots: ExpressionMatrix, executor: Executor, marginals: str,
                    drop_empty: bool) -> _CheckedInputs:
    """Summarise both matrices in one pass each, check their values and sizes, drop empty rows if asked."""
    _check_row_count(cells.shape[0], "scRNA", "cell")
    _check_row_count(spots.shape[0], "spots", "spot")
    cell_summary = summarize(cells.X, executor, label="statistics of the cells")
    spot_summary = summarize(spots.X, executor, label="statistics of the spots")
    empty_cells = _check_values(cell_summary, cells, "scRNA", marginals, drop_empty)
    empty_spots = _check_values(spot_summary, spots, "spots", marginals, drop_empty)
    all_cell_names, n_spots_input = pd.Index(cells.names), spots.shape[0]
    kept_cells = _without(cells.shape[0], empty_cells)
    kept_spots = _without(n_spots_input, empty_spots)
    dropped_spot_names = [str(n) for n in pd.Index(spots.names)[empty_spots]]
    if empty_cells.size:
        log.warning("drop_empty: %d of %d cells have zero total expression and are left unassigned (e.g. %s)",
                    empty_cells.size, len(all_cell_names), list(all_cell_names[empty_cells[:5]]))
        cells, cell_summary = _drop_rows(cells, cell_summary, kept_cells, executor)
    if empty_spots.size:
        log.warning("drop_empty: %d of %d spots have zero total expression and were left out (e.g. %s)",
                    empty_spots.size, n_spots_input, dropped_spot_names[:5])
        spots, spot_summary = _drop_rows(spots, spot_summary, kept_spots, executor)
    _check_row_count(cell_summary.n_rows, "scRNA", "cell", after_drop=empty_cells.size)
    _check_row_count(spot_summary.n_rows, "spots", "spot", after_drop=empty_spots.size)
    if marginals == "total":
        _warn_dominant_mass(cell_summary.row_totals, cells.names, "scRNA")
        _warn_dominant_mass(spot_summary.row_totals, spots.names, "spots")
    return _CheckedInputs(cells=cells, spots=spots, cell_summary=cell_summary, spot_summary=spot_summary,
                          all_cell_names=all_cell_names, kept_cells=kept_cells,
                          n_spots_input=n_spots_input, kept_spots=kept_spots,
                          dropped_spot_names=dropped_spot_names)


def _check_row_count(n_rows: int, role: str, row: str, after_drop: int = 0) -> None:
    if n_rows >= MIN_ROWS:
        return
    left = f" after dropping {after_drop} empty {row}(s)" if after_drop else ""
    if n_rows == 0:
        raise SSAInputError(f"{role}: no {row}s{left} (0 rows): nothing to align")
    raise SSAInputError(
        f"{role}: only {n_rows} {row}{left}; SSA z-scores every gene over the {row}s, which needs at least "
        f"{MIN_ROWS} {row}s" + (" (and with one spot every cell would map to it)" if row == "spot" else "")
    )


def _without(n_rows: int, dropped: np.ndarray) -> np.ndarray:
    keep = np.ones(n_rows, dtype=bool)
    keep[dropped] = False
    return np.flatnonzero(keep)


def _drop_rows(matrix: ExpressionMatrix, summary: MatrixSummary, kept: np.ndarray,
               executor: Executor) -> tuple[ExpressionMatrix, MatrixSummary]:
    """The matrix without its empty rows (a lazy blockwise row take, CSR blocks stay CSR) and its statistics.

    Empty rows add nothing to the per-gene sums and sums of squares when they hold only zeros; a
    row that sums to zero over signed values (``marginals="uniform"``) is subtracted from them.
    """
    n_rows = matrix.shape[0]
    keep = np.zeros(n_rows, dtype=bool)
    keep[kept] = True
    dropped = np.flatnonzero(~keep)
    gene_sum, gene_sumsq = summary.gene_sum, summary.gene_sumsq
    if summary.min_value < 0:
        (removed,) = executor.compute(matrix.X[dropped])
        removed = removed.toarray() if hasattr(removed, "toarray") else np.asarray(removed, dtype=np.float64)
        gene_sum = gene_sum - removed.sum(axis=0)
        gene_sumsq = gene_sumsq - (removed * removed).sum(axis=0)
    row_chunks = matrix.X.chunks[0]
    bounds = np.cumsum((0, *row_chunks))
    kept_chunks = tuple(int(keep[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:]))
    mask = da.from_array(keep[:, None], chunks=(row_chunks, (1,)))
    X = matrix.X.map_blocks(_take_rows, mask, chunks=(kept_chunks, matrix.X.chunks[1]), dtype=matrix.X.dtype,
                            meta=matrix.X._meta)
    obs = matrix.obs.iloc[kept] if matrix.obs is not None else pd.DataFrame(index=matrix.names[kept])
    coords = matrix.coords[kept] if matrix.coords is not None else None
    kept_matrix = replace(matrix, X=X, names=matrix.names[kept], coords=coords, obs=obs)
    kept_summary = replace(summary, n_rows=int(kept.size), gene_sum=gene_sum, gene_sumsq=gene_sumsq,
                           row_totals=summary.row_totals[kept])
    return kept_matrix, kept_summary


def _take_rows(block: Any, keep: np.ndarray) -> Any:
    """Rows of a dense or CSR block where ``keep`` (an ``(n, 1)`` boolean block) is true."""
    rows = np.flatnonzero(keep[:, 0])
    out = block[rows]
    return out.tocsr() if sp.issparse(out) else out


def _warn_dominant_mass(totals: np.ndarray, names: pd.Index, role: str) -> None:
    """Log a warning when one row's mass exceeds ``MASS_WARN_OVER_MEDIAN`` times the median row mass."""
    median = float(np.median(totals))
    largest = int(np.argmax(totals))
    ratio = float(totals[largest]) / median if median > 0 else float("inf")
    if ratio > MASS_WARN_OVER_MEDIAN:
        share = float(totals[largest] / totals.sum())
        log.warning(
            "%s: row %d (%s) holds %.3g times the median row mass (%.1f%% of the total; warning above %gx): the "
            "transport plan is dominated by it and the assignment of the other rows may be meaningless; check for "
            "unnormalised rows or wrong values, or use marginals='uniform'",
            role, largest, pd.Index(names)[largest], ratio, 100 * share, MASS_WARN_OVER_MEDIAN,
        )


def _expand_cells(ds: xr.Dataset, kept: np.ndarray, n_all: int) -> xr.Dataset:
    """Every per-cell variable over all ``n_all`` input cells: kept rows filled in, the others unassigned."""
    variables = {}
    for name, var in ds.data_vars.items():
        if "cell" not in var.dims:
            variables[name] = var
            continue
        values = var.values
        if values.dtype.kind in "iu":
            fill: Any = -1
        elif values.dtype.kind == "O":
            fill = ""
        else:
            fill = np.nan
        full = np.full((n_all, *values.shape[1:]), fill, dtype=values.dtype)
        full[kept] = values
        variables[name] = xr.Variable(var.dims, full, attrs=var.attrs)
    coords = {k: v for k, v in ds.coords.items() if "cell" not in v.dims}
    return xr.Dataset(variables, coords=coords, attrs=ds.attrs)
