"""The refined mode: mirror-descent steps on the cost of an SSA solution, blockwise on the kernel storage.

Starting from the SSA plan ``T`` (cost ``D``, potentials ``f``, ``g``), each step (``refine_maths``)

1. pass A, one reduction over the row blocks: ``s = T^T 1`` and ``T^T X`` (``X``: the cells over the
   selected genes as read, CSR kept CSR; the representation compared, z-scored or as given, is a
   per-gene affine map applied to the small reduced matrices);
2. on the driver: the objective ``O`` (gene-wise + spot-wise cosine of ``P = diag(1/s) T^T X`` with
   the spots), the gradient factors ``W``, ``c`` of ``G_ij = X_i . W_j - c_j`` and the step scale
   ``M = max |G_ij|`` over a fixed row sample;
3. pass B: every kernel block updated where it lives, ``D += eta eps G / M`` (log domain) or
   ``K *= exp(-eta G / M)`` (one GEMM per block; the n x m gradient is never formed);
4. ``inner`` Sinkhorn iterations warm-started from ``g``.

The changes add up to ``C_N = D + X A^T - 1 a^T`` with ``X`` the cells' input values: the result
records ``(A, a)`` so that :func:`ssa_dask.open_plan` rebuilds the refined plan.
"""

from __future__ import annotations

import logging
import numbers
import operator
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import dask.array as da
import numpy as np
import scipy.sparse as sp
import xarray as xr

from ssa_dask._refine_blocks import plan_moments, refined_block, rewrite_stored, take_rows, update_in_place
from ssa_dask.assign import SPOT_DIM
from ssa_dask.cluster import Executor
from ssa_dask.errors import ConvergenceWarning, SSAInputError
from ssa_dask.kernel import Kernel
from ssa_dask.kernel.storage import DiskBlocks, MemoryBlocks
from ssa_dask.kernel.store import check_free_space
from ssa_dask.reference import FEATURES, feature_scaling, gene_cosine, held_out_genes, refine_direction, stalled, step_scale_rows
from ssa_dask.sinkhorn import DEFAULT_TOL, SinkhornResult, sinkhorn

log = logging.getLogger(__name__)

#: Step size ``eta`` (the dense probe of issue 12).
DEFAULT_ETA = 5.0
#: Warm-started Sinkhorn iterations after each step.
DEFAULT_INNER = 20
#: Representation of cells and spots compared by the objective (see :func:`ssa_dask.reference.feature_scaling`):
#: the values as read (what the guard ablation picked; z-scored genes were unstable without a capacity prior).
DEFAULT_FEATURES = "input"
#: ``refine="auto"``: share of the selected genes held out of the objective, and the seed that picks them.
AUTO_HELD_OUT = 0.1
AUTO_SEED = 0
#: ``refine="auto"``: stop when the held-out gene-wise cosine has not risen for this many steps ...
AUTO_PATIENCE = 3
#: ... or after this many steps.
AUTO_MAX_STEPS = 50


@dataclass
class RefineResult:
    """Output of :func:`refine`.

    Attributes
    ----------
    g : (n_spots,) float64 array
        Column potential of the refined plan after the last step.
    kernel_g : (n_spots,) float64 array
        The column potential to use with the kernel's blocks as they are now (in the kernel domain
        they hold the refined kernel with the potentials so far absorbed; else equal to ``g``).
    row_offset : (n_cells,) float64 array or None
        What the kernel domain absorbed into the rows: the row potential of the refined plan is
        this plus the one computed from the blocks (``Kernel.top_k``).  None in the log domain.
    steps : int
        Steps done.
    objective : (steps + 1,) array
        Objective ``O`` of the plan before each step and after the last.
    held_out_score : (steps + 1,) array or None
        Gene-wise cosine over the held-out genes (``held_out``) at the same points.
    A : (n_spots, n_genes) array
        Correction over the cells' input values: the refined cost is ``D + X A^T - 1 a^T``.
    a : (n_spots,) array
        Column offset of the correction.
    marginal_error : float
        Column-marginal L1 error after the last inner Sinkhorn iteration.
    inner_iterations : int
        Sinkhorn iterations done by all steps together.
    step_seconds : list of float
        Wall time of each step (plan moments, update and inner iterations).
    seconds : float
        Wall time of the whole refinement.
    """

    g: np.ndarray
    kernel_g: np.ndarray
    row_offset: np.ndarray | None
    steps: int
    objective: np.ndarray
    held_out_score: np.ndarray | None
    A: np.ndarray
    a: np.ndarray
    marginal_error: float
    inner_iterations: int
    step_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0


def check_refine_options(refine: Any, eta: Any, inner: Any) -> None:
    """Raise :class:`SSAInputError` naming the problem unless the refine options are usable.

    ``refine`` is ``None`` (no refinement), a positive number of steps, or ``"auto"``; ``eta`` a
    positive finite number; ``inner`` a positive integer.
    """
    if refine is not None and refine != "auto":
        if isinstance(refine, bool) or not isinstance(refine, numbers.Integral) or refine < 1:
            raise SSAInputError(f"refine must be None, a positive number of steps or 'auto', got {refine!r}")
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not np.isfinite(eta) or eta <= 0:
        raise SSAInputError(f"refine_eta must be a positive finite number, got {eta!r}")
    if isinstance(inner, bool) or not isinstance(inner, numbers.Integral) or inner < 1:
        raise SSAInputError(f"refine_inner must be a positive integer, got {inner!r}")


def refine_schedule(refine: int | Literal["auto"], n_genes: int) -> tuple[int, np.ndarray | None, int | None]:
    """Steps, held-out genes and patience of a ``refine`` option: ``N`` steps, or ``"auto"`` early stopping."""
    if refine == "auto":
        return AUTO_MAX_STEPS, held_out_genes(n_genes, AUTO_HELD_OUT, AUTO_SEED), AUTO_PATIENCE
    return int(refine), None, None


def refine(
    kernel: Kernel,
    sinkhorn_result: SinkhornResult,
    p: np.ndarray | list[Any],
    q: np.ndarray,
    cells: da.Array | list[Any],
    spots: np.ndarray,
    *,
    cell_stats: tuple[np.ndarray, np.ndarray] | None = None,
    features: str = DEFAULT_FEATURES,
    steps: int = 30,
    eta: float = DEFAULT_ETA,
    inner: int = DEFAULT_INNER,
    tol: float = DEFAULT_TOL,
    tau: float = 0.0,
    held_out: np.ndarray | None = None,
    patience: int | None = None,
    executor: Executor | None = None,
) -> RefineResult:
    """Refine an SSA solution in place of its kernel storage (the steps of ``refine_maths``).

    Parameters
    ----------
    kernel : Kernel
        The kernel (or cost) the solution was computed on; its blocks are replaced by the refined
        ones (memory: new blocks on the workers that held the old ones, local arrays overwritten;
        Zarr: every chunk rewritten atomically to a fresh array, the old chunks removed).
    sinkhorn_result : SinkhornResult
        The SSA solution (its ``g`` starts the refinement).
    p, q : arrays
        Row and column masses of the solution (``p`` may be the kernel's row split).
    cells : dask.array.Array or list
        ``(n_cells, G)`` cells over the selected genes, with the kernel's row blocks (a Dask array,
        computed once and held; or its blocks already held, one per kernel block).
    spots : (n_spots, G) array
        The spots over the same genes (input values).
    cell_stats : (mean, std) of (G,) arrays
        Per-gene statistics of the cells (needed by ``features="zscore"``).
    features : {"zscore", "input"}
        Representation compared by the objective.
    steps : int
        Steps (the cap when ``patience`` is given).
    eta : float
        Step size: each update moves the cost by at most ``eta * eps`` on the sampled rows.
    inner : int
        Warm-started Sinkhorn iterations per step (fewer when they reach ``tol``).
    tol : float
        Sinkhorn stopping tolerance.
    tau : float
        Trust region: ``C <- C - tau (C - D)`` before each update.
    held_out : int array, optional
        Genes left out of the objective; their gene-wise cosine is recorded.
    patience : int, optional
        Stop when the held-out cosine has not risen for this many steps (needs ``held_out``).
    executor : Executor, optional
        Where blocks are processed (default: local threads).

    Returns
    -------
    RefineResult

    Notes
    -----
    In the kernel domain each update absorbs the potentials into the blocks (they then hold the
    plan of the changed cost after one row update, see :func:`ssa_dask._refine_blocks.absorbed_block`),
    so the entries stay in float32's range however far the changes add up, and the inner iterations
    keep the fast kernel-domain sweep; in the log domain the blocks hold the refined cost.
    """
    executor = executor or Executor()
    began = time.perf_counter()
    n_cells, n_spots = kernel.shape
    spots = np.asarray(spots, dtype=np.float64)
    if spots.ndim != 2 or spots.shape[0] != n_spots:
        raise SSAInputError(f"spots have shape {spots.shape}, expected ({n_spots}, n_genes)")
    n_genes = spots.shape[1]
    if features not in FEATURES:
        raise SSAInputError(f"features must be one of {FEATURES}, got {features!r}")
    if features == "zscore" and cell_stats is None:
        raise SSAInputError("features='zscore' needs cell_stats (per-gene mean and std of the cells)")
    if patience is not None and held_out is None:
        raise SSAInputError("patience needs held_out genes")
    stats = cell_stats if cell_stats is not None else (np.zeros(n_genes), np.ones(n_genes))
    scale, shift = feature_scaling(*stats, features)
    spot_scale, spot_shift = feature_scaling(spots.mean(0), spots.std(0), features)
    S = spots * spot_scale - spot_shift
    train = np.ones(n_genes, dtype=bool)
    if held_out is not None:
        train[held_out] = False
    if isinstance(kernel.storage, DiskBlocks):
        check_free_space(kernel.storage.store.root, n_cells * n_spots * 4)  # one refined copy beside the current one

    p_blocks = kernel.row_vector(p, executor)
    X_blocks = _cell_blocks(kernel, cells, executor)
    Z_sample = (_sample_rows(kernel, X_blocks, step_scale_rows(n_cells), executor) * scale - shift).astype(np.float32)
    g = np.asarray(sinkhorn_result.g, dtype=np.float64).copy()  # column potential in the blocks' frame
    absorbed_g = np.zeros(n_spots)  # kernel domain: what the blocks absorbed (refined g = absorbed_g + g)
    absorbed_f: list[np.ndarray] | None = None if kernel.log_domain else [np.zeros(b - a) for a, b in
                                                                           zip(kernel.bounds[:-1], kernel.bounds[1:])]
    A, a = np.zeros((n_spots, n_genes)), np.zeros(n_spots)
    objective: list[float] = []
    held: list[float] = []
    step_seconds: list[float] = []
    marginal_error, inner_iterations = sinkhorn_result.marginal_error, 0
    done = 0
    while True:
        start = time.perf_counter()
        moments = kernel.map_blocks(plan_moments, executor, X_blocks, p_blocks, reduce="sum", g=g, eps=kernel.eps,
                                    log_domain=kernel.log_domain, label="refine: plan moments")
        s = moments[:, 0]
        value, P, W, c = refine_direction(moments[:, 1:] * scale - np.outer(s, shift), s, S, train)
        objective.append(value)
        if held_out is not None:
            held.append(gene_cosine(P[:, ~train], S[:, ~train]))
        if done:
            log.info("refine step %d: objective %.6f%s, %.1f s", done, value,
                     f", held-out cosine {held[-1]:.6f}" if held else "", step_seconds[-1])
        largest = float(np.abs(Z_sample @ W.T.astype(np.float32) - c).max())  # SGEMM, like the blocks' products
        if done == steps or (patience is not None and stalled(held, patience)) or not largest > 0:
            break
        step = eta * kernel.eps / largest
        # In the input values: Z_i . W_j = X_i . (scale * W_j) - shift . W_j.
        B = step * W * scale - tau * A
        b = step * (c + W @ shift) - tau * a
        row_potential = _update_blocks(kernel, X_blocks, p_blocks, g, B, b, executor, done + 1)
        if absorbed_f is not None:
            absorbed_g += g
            absorbed_f = [held + f for held, f in zip(absorbed_f, row_potential)]
            g = np.zeros(n_spots)
        A, a = A + B, a + b
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a few iterations per step, by design
            solved = sinkhorn(kernel, p_blocks, q, tol=tol, max_iter=inner, init_g=g, executor=executor)
        g, marginal_error = solved.g, solved.marginal_error
        inner_iterations += solved.n_iter
        done += 1
        step_seconds.append(time.perf_counter() - start)
    return RefineResult(g=absorbed_g + g, kernel_g=g,
                        row_offset=None if absorbed_f is None else np.concatenate(absorbed_f), steps=done, objective=np.asarray(objective),
                        held_out_score=np.asarray(held) if held_out is not None else None, A=A, a=a,
                        marginal_error=marginal_error, inner_iterations=inner_iterations, step_seconds=step_seconds,
                        seconds=time.perf_counter() - began)


def refine_solution(kernel: Kernel, sinkhorn_result: SinkhornResult, p: np.ndarray | list[Any], q: np.ndarray,
                    cells: da.Array, spots: da.Array, executor: Executor, *, cell_stats: tuple[np.ndarray, np.ndarray],
                    option: int | Literal["auto"], eta: float, inner: int, tol: float) -> RefineResult:
    """:func:`refine` as :func:`ssa_dask.align` runs it: the schedule of its ``refine`` option, the lazy spots read once."""
    (spot_values,) = executor.compute(spots)
    spot_values = spot_values.toarray() if sp.issparse(spot_values) else np.asarray(spot_values)
    steps, held_out, patience = refine_schedule(option, spot_values.shape[1])
    refined = refine(kernel, sinkhorn_result, p, q, cells, spot_values, cell_stats=cell_stats, steps=steps, eta=eta,
                         inner=inner, tol=tol, held_out=held_out, patience=patience, executor=executor)
    log.info("refined in %d step(s), %.1f s: objective %.4f -> %.4f", refined.steps, refined.seconds,
             refined.objective[0], refined.objective[-1])
    return refined


def with_refinement(ds: xr.Dataset, refined: RefineResult, *, option: int | Literal["auto"], eta: float,
                    inner: int) -> xr.Dataset:
    """The result with the refinement recorded: ``refine_A`` (spot x gene), ``refine_a`` and ``refine_*`` attrs."""
    ds = ds.assign(refine_A=((SPOT_DIM, "gene"), refined.A), refine_a=(SPOT_DIM, refined.a))
    ds["refine_A"].attrs["description"] = ("refined cost = D + X refine_A^T - 1 refine_a^T, X: the cells' values over the "
                                           "genes used, as read")
    ds.attrs.update(
        refine=str(option), refine_steps=refined.steps, refine_eta=float(eta), refine_inner=int(inner),
        refine_features=DEFAULT_FEATURES, refine_objective=[float(v) for v in refined.objective],
        refine_marginal_error=refined.marginal_error, refine_inner_iterations=refined.inner_iterations,
        refine_seconds=refined.seconds, refine_step_seconds=[float(v) for v in refined.step_seconds],
    )
    if refined.held_out_score is not None:
        ds.attrs["refine_held_out_cosine"] = [float(v) for v in refined.held_out_score]
    return ds


def _cell_blocks(kernel: Kernel, cells: da.Array | list[Any], executor: Executor) -> list[Any]:
    """The cells' row blocks, held: in this process, or on a cluster on the workers holding the kernel blocks."""
    if isinstance(cells, list):
        blocks = cells
    else:
        if tuple(np.cumsum((0, *cells.chunks[0]))) != tuple(kernel.bounds):
            raise SSAInputError("cells must have the kernel's row blocks")
        blocks = executor.materialize_blocks(cells.rechunk({1: -1}), label="refine: cells")
    if len(blocks) != len(kernel.blocks):
        raise SSAInputError(f"{len(blocks)} blocks of cells for {len(kernel.blocks)} kernel blocks")
    if executor.distributed and isinstance(kernel.storage, MemoryBlocks):
        who_has = executor.client.who_has(kernel.blocks)
        blocks = [executor.client.submit(_same, cell_block, workers=list(who_has.get(block.key, ())) or None, pure=False)
                  for cell_block, block in zip(blocks, kernel.blocks)]
    return blocks


def _same(value: Any) -> Any:
    return value


def _sample_rows(kernel: Kernel, X_blocks: list[Any], rows: np.ndarray, executor: Executor) -> np.ndarray:
    """The cells' rows ``rows`` (input values), gathered from the blocks that hold them."""
    bounds = kernel.bounds
    owner = np.searchsorted(bounds, rows, side="right") - 1
    picked = [i for i in range(len(X_blocks)) if np.any(owner == i)]
    parts = executor.map(take_rows, [X_blocks[i] for i in picked], [rows[owner == i] - bounds[i] for i in picked])
    return np.concatenate(parts, axis=0)


def _update_blocks(kernel: Kernel, X_blocks: list[Any], p_blocks: list[Any], g: np.ndarray, B: np.ndarray,
                   b: np.ndarray, executor: Executor, step: int) -> list[np.ndarray] | None:
    """Pass B: every block of the storage changed by ``X B^T - 1 b^T``, where it lives.

    Returns the row potential each block absorbed (kernel domain), or None (log domain).
    """
    storage = kernel.storage
    options = dict(g=g, eps=kernel.eps, log_domain=kernel.log_domain)
    if executor.distributed:
        B = executor.client.scatter(B, broadcast=True, hash=False)
    if isinstance(storage, DiskBlocks):
        name = f"refine-{step % 2}.zarr"
        storage.store.create_array(name)  # a fresh array: the chunks read stay untouched (retry-safe)
        targets = storage.store.blocks(name)
        f = kernel.map_blocks(rewrite_stored, executor, X_blocks, p_blocks, targets, B=B, b=b, label="refine: update",
                              **options)
        for old in storage.blocks:
            old.remove()
        storage.blocks = targets
        return None if kernel.log_domain else f
    if isinstance(storage, MemoryBlocks) and executor.distributed:
        client = executor.client
        who_has = client.who_has(storage.blocks)
        # The old futures are dropped as soon as their replacements are submitted: each old block is
        # released once its new one exists, so the workers hold about one copy of the kernel.
        pairs = [client.submit(refined_block, block, X, p, B=B, b=b, workers=list(who_has.get(block.key, ())) or None,
                               pure=False, **options) for block, X, p in zip(storage.blocks, X_blocks, p_blocks)]
        storage.blocks = [client.submit(operator.itemgetter(0), pair, workers=list(who_has.get(block.key, ())) or None, pure=False)
                          for pair, block in zip(pairs, storage.blocks)]
        f = client.gather([client.submit(operator.itemgetter(1), pair, pure=False) for pair in pairs])
        from distributed import wait

        wait(storage.blocks)
        return None if kernel.log_domain else f
    if isinstance(storage, MemoryBlocks):
        f = kernel.map_blocks(update_in_place, executor, X_blocks, p_blocks, B=B, b=b, **options)
        return None if kernel.log_domain else f
    raise TypeError(f"refine cannot update a kernel storage of type {type(storage).__name__}")

