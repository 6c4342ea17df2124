"""The whole transport plan of an SSA result, lazily: never stored, recomputed block by block.

A result of :func:`ssa_dask.align` holds the row potential ``f`` (``potential``), the column
potential ``g`` (:func:`ssa_dask.column_potential`) and ``eps``.  With the cost ``D = 1 - |rho|``
recomputed from the inputs exactly as :func:`~ssa_dask.align` computes it, the plan is

    T_ij = exp((f_i + g_j - D_ij) / eps),

whose rows sum to the cell masses ``p`` and columns to the spot masses ``q``.  A result of the
refined mode (``align(refine=...)``) holds ``refine_A``, ``refine_a``: its cost is
``D + X A^T - 1 a^T`` (``X``: the cells over the genes used), added to each block.  Every quantity a
user wants from it is one pass over row blocks of cells: each task recomputes its block of ``D``
(float32, as in ``align``), turns it into its block of ``T`` in float64, reduces it, and drops it.
Memory is linear in cells + spots x features; the dense ``n x m`` plan is never formed.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr
from dask.delayed import Delayed

from ssa_dask._refine_blocks import cost_increment
from ssa_dask.align import _checked_inputs, _take_rows, default_block_rows
from ssa_dask.assign import column_potential, read_result
from ssa_dask.cluster import Executor, connect
from ssa_dask.cost import PearsonCost, cost_blocks, lazy_pearson_cost
from ssa_dask.errors import SSAInputError
from ssa_dask.kernel._block_math import top_k_columns
from ssa_dask.io import ExpressionMatrix, _take_columns, read_expression

log = logging.getLogger(__name__)

#: Largest relative error of a recomputed row sum against the cell mass ``p`` accepted on open.
#: A consistent plan matches to float32 rounding (about 1e-6); inputs other than the ones the
#: result was computed from (another normalisation, other cells, shuffled spots) miss by far more.
ROW_SUM_RTOL = 1e-3
#: :func:`open_plan` checks the row sums of the first ``CHECKED_ROWS`` cells of the first, middle and
#: last row blocks (a few spot-sized rows, not whole blocks).
CHECKED_ROWS = 256


class TransportPlan:
    """The transport plan of an SSA result over the input cells and spots, applied blockwise.

    Built by :func:`open_plan`.  Rows are the input cells in input order and columns the input
    spots; cells and spots that ``align(drop_empty=True)`` left out have empty rows and columns.
    Every method is one pass over row blocks of cells on the plan's executor (local threads or a
    ``distributed`` client), recomputing each block of the cost; use the plan as a context manager
    (or call :meth:`close`) to stop a cluster that :func:`open_plan` started.

    Attributes
    ----------
    cells : ExpressionMatrix
        The cells the plan was opened with (all input cells, all genes).
    cell_names, spot_names : pandas.Index
        Row and column names.
    spot_coords : (n_spots, 2) array or None
        Spot coordinates when the spot input has them.
    eps : float
        Entropic regularisation of the result.
    executor : Executor
        Where the passes run.
    """

    def __init__(self, *, cells: ExpressionMatrix, kept_X: da.Array, gene_columns: np.ndarray, block_rows: int,
                 cost: PearsonCost | Delayed, f: np.ndarray, g: np.ndarray, eps: float, p: np.ndarray,
                 kept_cells: np.ndarray, kept_spots: np.ndarray, spot_names: pd.Index, spot_coords: np.ndarray | None,
                 executor: Executor, stack: contextlib.ExitStack | None = None,
                 refinement: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        # kept_X: the kept cells over all genes; gene_columns: its columns of the result's genes;
        # cost: the spot profiles (held); f, p: per kept cell; g: per kept spot; refinement: the
        # refined mode's (A, a) per kept spot, the cost then being D + X A^T - 1 a^T.
        self.cells = cells
        self.cell_names = pd.Index(cells.names)
        self.spot_names = pd.Index(spot_names)
        self.spot_coords = spot_coords
        self.eps = float(eps)
        self.executor = executor
        self._X_all_genes = kept_X
        self._gene_columns = np.asarray(gene_columns)
        self._block_rows = int(block_rows)
        self._X = self._cells_over_genes(fresh=False)  # the blocking, and the template of every pass
        self._cost = cost
        self._f = np.asarray(f, dtype=np.float64)
        self._g = np.asarray(g, dtype=np.float64)
        self._p = np.asarray(p, dtype=np.float64)
        self._kept_cells = np.asarray(kept_cells)
        self._kept_spots = np.asarray(kept_spots)
        self._stack = stack
        self._refinement = refinement
        # The row potentials as an (n, 1) array in the plan's row chunks: on a cluster held in
        # worker memory once, so the passes' graphs refer to them instead of carrying them.
        column = _column(self._f, self.row_chunks)
        self._f_column = executor.client.persist(column) if executor.distributed else column

    # ------------------------------------------------------------------ shape and lifetime

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_cells, n_spots)`` of the input."""
        return (len(self.cell_names), len(self.spot_names))

    @property
    def row_chunks(self) -> tuple[int, ...]:
        """Cells per row block (of the cells kept in the plan)."""
        return tuple(self._X.chunks[0])

    @property
    def kept_cells(self) -> np.ndarray:
        """Indices of the input cells in the plan (all of them unless ``drop_empty`` left some out)."""
        return self._kept_cells

    @property
    def kept_spots(self) -> np.ndarray:
        """Indices of the input spots in the plan."""
        return self._kept_spots

    def close(self) -> None:
        """Stop the executor (and a cluster) that :func:`open_plan` started; a given client stays open."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def __enter__(self) -> TransportPlan:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        n, m = self.shape
        return (f"TransportPlan({n} cells x {m} spots, {len(self.row_chunks)} row blocks, eps={self.eps:.4g}, "
                f"{'distributed' if self.executor.distributed else 'local threads'})")

    # ------------------------------------------------------------------ the engine

    def map_row_blocks(self, func: Callable[..., np.ndarray], *cell_arrays: Any, spot_arrays: Sequence[Any] = (),
                       reduce: str = "rows", width: int, label: str | None = None) -> np.ndarray:
        """Run ``func`` on every row block of the plan, in one pass; the building block of every method.

        ``func(T, *cell_blocks, *spot_arrays)`` receives the float64 plan block ``T`` (cells of the
        block x spots kept), the matching rows of each cell-side array and the spot-side arrays whole.

        Parameters
        ----------
        func : callable
            A module-level function (it travels to the workers).  With ``reduce="rows"`` it returns
            ``(rows of the block, width)``; with ``reduce="sum"`` any array of ``width`` elements,
            summed over blocks.
        *cell_arrays
            Arrays over the plan's kept cells (NumPy, SciPy sparse or Dask; one row per kept cell).
        spot_arrays : sequence
            Arrays over the kept spots (or anything small), sent once to each worker.
        reduce : {"rows", "sum"}
            Concatenate per-block rows, or sum the per-block arrays.
        width : int
            Columns (``rows``) or elements (``sum``) of each block's output.
        label : str, optional
            Progress-bar label.

        Returns
        -------
        numpy.ndarray
            ``(n_kept_cells, width)`` or ``(width,)``.
        """
        if reduce not in ("rows", "sum"):
            raise ValueError(f"reduce must be 'rows' or 'sum', got {reduce!r}")
        n_kept = self._X.shape[0]
        chunks = self.row_chunks
        arrays = [self._cost_blocks(), self._f_column]
        arrays += [_row_chunked(values, chunks, n_kept) for values in cell_arrays]
        spot_args = [dask.delayed(value, pure=True) for value in (self._g, *spot_arrays)]
        task = partial(_plan_task, func, len(cell_arrays), reduce == "sum", self.eps)
        if reduce == "sum":
            out_chunks: tuple = ((1,) * len(chunks), (width,))
        else:
            out_chunks = (chunks, (width,))
        blocks = da.map_blocks(task, *arrays, *spot_args, dtype=np.float64, chunks=out_chunks,
                               meta=np.empty((0, 0), np.float64), token="ssa-plan")
        result = blocks.sum(axis=0) if reduce == "sum" else blocks
        (values,) = self.executor.compute(result, label=label)
        return np.asarray(values)

    def _cost_blocks(self) -> da.Array:
        """The cost blocks of the plan: ``D``, or the refined ``D + X A^T - 1 a^T`` of a refined result."""
        X = self._cells_over_genes()
        if self._refinement is None:
            return cost_blocks(X, self._cost, self._kept_spots.size)
        return X.map_blocks(_refined_cost, self._held_cost(), *self._held_refinement(), dtype=np.float64,
                            chunks=(X.chunks[0], (self._kept_spots.size,)), meta=np.empty((0, 0), np.float64))

    def _held_cost(self) -> Delayed:
        """The spot profiles as one graph key (held on a worker already, or sent once per worker)."""
        return self._cost if isinstance(self._cost, Delayed) else dask.delayed(self._cost, pure=True)

    def _held_refinement(self) -> list[Delayed | None]:
        """``(A, a)`` of a refined result as graph keys, or ``[None, None]``."""
        if self._refinement is None:
            return [None, None]
        return [dask.delayed(values, pure=True) for values in self._refinement]

    def _cells_over_genes(self, fresh: bool = True) -> da.Array:
        """The kept cells over the result's genes, in the plan's row blocks.

        With ``fresh``, under keys of this pass's own: passes share the cells' input blocks, and
        dask fuses a shared input differently in graphs where it has one consumer or two
        (``impute`` reads the cells twice); a scheduler that receives one key under two task
        definitions warns that it may deadlock.  Nothing is reused between passes anyway.
        """
        source = self._X_all_genes
        name = f"ssa-plan-cells-{uuid.uuid4().hex}" if fresh else None
        X = source.map_blocks(_take_columns, self._gene_columns, chunks=(source.chunks[0], (self._gene_columns.size,)),
                              meta=source._meta, name=name)
        return X.rechunk((self._block_rows, X.shape[1]))

    # ------------------------------------------------------------------ from the kept rows to the input

    def expand_cells(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Per-kept-cell rows placed over every input cell (left-out cells get ``fill``)."""
        if self._kept_cells.size == self.shape[0]:
            return values
        out = np.full((self.shape[0], *values.shape[1:]), fill, dtype=values.dtype)
        out[self._kept_cells] = values
        return out

    def expand_spots(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Per-kept-spot rows placed over every input spot (left-out spots get ``fill``)."""
        if self._kept_spots.size == self.shape[1]:
            return values
        out = np.full((self.shape[1], *values.shape[1:]), fill, dtype=values.dtype)
        out[self._kept_spots] = values
        return out

    def kept_rows(self, values: Any) -> Any:
        """The rows of a per-input-cell array (NumPy, SciPy sparse or Dask) for the cells in the plan."""
        if getattr(values, "shape", (None,))[0] != self.shape[0]:
            raise SSAInputError(f"expected {self.shape[0]} rows (one per cell), got an array of shape "
                                f"{getattr(values, 'shape', None)}")
        if self._kept_cells.size == self.shape[0]:
            return values
        if isinstance(values, da.Array):
            return _take_rows_lazy(values, self._kept_cells)
        return values[self._kept_cells]

    # ------------------------------------------------------------------ public passes

    def apply(self, V: Any, axis: int = 0, *, normalize: bool = False) -> np.ndarray:
        """Multiply by the plan: ``T^T V`` (``axis=0``, cells -> spots) or ``T V`` (``axis=1``, spots -> cells).

        Parameters
        ----------
        V : array
            ``axis=0``: ``(n_cells,)`` or ``(n_cells, k)`` (NumPy, SciPy sparse or Dask, rows in
            input cell order; on a cluster give a large one as a Dask array, since NumPy and SciPy
            values travel inside the task graph); ``axis=1``: ``(n_spots,)`` or ``(n_spots, k)`` NumPy.
        axis : {0, 1}
            The plan axis summed over, as in ``numpy.sum`` (0: over cells, 1: over spots).
        normalize : bool
            Use the row-normalised plan ``T_ij / sum_l T_il`` (each cell a distribution over spots):
            ``axis=0`` then gives expected counts of cells per spot, ``axis=1`` the expectation of
            a spot quantity for each cell.

        Returns
        -------
        numpy.ndarray
            ``(n_spots[, k])`` for ``axis=0``, ``(n_cells[, k])`` for ``axis=1``; rows of left-out
            spots (``axis=0``) or cells (``axis=1``) are 0.
        """
        if axis not in (0, 1):
            raise ValueError("axis must be 0 (cells -> spots) or 1 (spots -> cells)")
        one_dimensional = len(getattr(V, "shape", ())) == 1
        if axis == 0:
            rows = self.kept_rows(V[:, None] if one_dimensional else V)
            k = int(rows.shape[1])
            out = self.map_row_blocks(partial(_transpose_product, normalize), rows, reduce="sum",
                                      width=self._kept_spots.size * k, label="plan^T V")
            out = self.expand_spots(out.reshape(self._kept_spots.size, k))
        else:
            values = np.asarray(V, dtype=np.float64)
            values = values[:, None] if one_dimensional else values
            if values.ndim != 2 or values.shape[0] != self.shape[1]:
                raise SSAInputError(f"apply(axis=1) needs ({self.shape[1]}, k) values (one row per spot), got "
                                    f"shape {np.shape(V)}")
            k = values.shape[1]
            out = self.map_row_blocks(partial(_product, normalize), spot_arrays=[values[self._kept_spots]],
                                      reduce="rows", width=k, label="plan V")
            out = self.expand_cells(out)
        return out[:, 0] if one_dimensional else out

    def row_marginal(self) -> np.ndarray:
        """``T 1``: mass of each cell (the masses ``p`` up to float32 rounding; 0 for left-out cells)."""
        return self.expand_cells(self.map_row_blocks(_row_sums, reduce="rows", width=1, label="row marginal")[:, 0])

    def column_marginal(self) -> np.ndarray:
        """``T^T 1``: mass of each spot (the masses ``q`` to the Sinkhorn tolerance; 0 for left-out spots)."""
        return self.expand_spots(self.map_row_blocks(_column_sums, reduce="sum", width=self._kept_spots.size,
                                                   label="column marginal"))

    def entropy(self) -> np.ndarray:
        """Shannon entropy (nats) of each cell's row-normalised plan; NaN for left-out cells.

        0 when a cell sits on one spot, ``log(n_spots)`` when it is spread evenly.
        """
        values = self.map_row_blocks(_entropy, reduce="rows", width=1, label="entropy")[:, 0]
        return self.expand_cells(values, fill=np.nan)

    def top_k(self, k: int) -> sp.csr_matrix:
        """The ``k`` largest entries of each cell's row-normalised plan, as a sparse cells x spots matrix.

        Parameters
        ----------
        k : int
            Entries kept per cell, ``1 <= k <= n_spots``.

        Returns
        -------
        scipy.sparse.csr_matrix
            ``(n_cells, n_spots)`` float64, ``k`` entries per row (none for left-out cells), each
            ``T_ij / sum_l T_il``; a row's entries sum to the mass the ``k`` spots hold.
        """
        n_spots = self._kept_spots.size
        if not 1 <= k <= n_spots:
            raise SSAInputError(f"k must be between 1 and the number of spots ({n_spots}), got {k}")
        values = self.map_row_blocks(partial(_top_k, k), reduce="rows", width=2 * k, label="top-k")
        columns = self._kept_spots[values[:, :k].astype(np.int64)]
        rows = np.repeat(self._kept_cells, k)
        return sp.csr_matrix((values[:, k:].ravel(), (rows, columns.ravel())), shape=self.shape)


# ---------------------------------------------------------------------- open


def open_plan(
    result: xr.Dataset | str,
    cells: Any,
    spots: Any,
    *,
    client: Any = None,
    sc_layer: str | None = None,
    spots_layer: str | None = None,
    gene_key: str | None = None,
    log1p: bool | None = None,
    block_rows: int | None = None,
    check: bool = True,
    progress: bool = False,
) -> TransportPlan:
    """Open the transport plan of an SSA result without running Sinkhorn again.

    Parameters
    ----------
    result : xarray.Dataset or str
        Output of :func:`ssa_dask.align`, or the path of its Zarr store.
    cells, spots
        The inputs the result was computed from, as for :func:`ssa_dask.align` (AnnData, path,
        array...); read lazily.
    client
        Where the passes run, as for :func:`ssa_dask.align` (``None``: local threads; ``"local"``:
        an embedded LocalCluster, stopped by :meth:`TransportPlan.close`; an address or a
        ``distributed.Client``).
    sc_layer, spots_layer, gene_key
        As for :func:`ssa_dask.align`.
    log1p : bool, optional
        As for :func:`ssa_dask.align`; default: ``result.attrs["log1p"]`` when recorded, else False.
    block_rows : int, optional
        Cells per row block (default: float64 plan blocks of about 128 MiB, one per thread at least).
    check : bool
        Recompute the row sums of three row blocks and compare them with the cell masses ``p``.
    progress : bool
        Show progress bars.

    Returns
    -------
    TransportPlan

    Raises
    ------
    SSAInputError
        The result lacks the potentials, or the inputs are not the ones it was computed from
        (other cells or spots, genes missing, row sums that do not match the cell masses).
    """
    if isinstance(result, (str, bytes)) or hasattr(result, "__fspath__"):
        result = read_result(str(result))
    _check_result(result)
    attrs = result.attrs
    if log1p is None:
        log1p = bool(attrs.get("log1p", False))
    cell_matrix = read_expression(cells, layer=sc_layer, gene_key=gene_key, log1p=log1p, role="scRNA")
    spot_matrix = read_expression(spots, layer=spots_layer, gene_key=gene_key, log1p=log1p, role="spots")
    genes = pd.Index([str(g) for g in result["gene"].values])
    _check_shapes(result, cell_matrix, spot_matrix, genes)
    with contextlib.ExitStack() as stack:
        executor = stack.enter_context(connect(client, progress=progress))
        plan = _build_plan(result, cell_matrix, spot_matrix, genes, executor, block_rows)
        if check:
            _check_row_sums(plan)
        plan._stack = stack.pop_all()
    return plan


def _check_result(result: xr.Dataset) -> None:
    missing = [name for name in ("potential",) if name not in result]
    missing += [name for name in ("eps",) if name not in result.attrs]
    if "column_potential" not in result and "column_potential" not in result.attrs:
        missing.append("column_potential")
    if "gene" not in result.coords:
        missing.append("gene (coordinate)")
    if missing:
        raise SSAInputError(f"the result lacks {missing}: open_plan needs a result of ssa_dask.align (potentials, "
                            "eps and the genes used)")
    if result.attrs.get("kernel_storage") == "multiscale":
        raise SSAInputError("this result was aligned with kernel='multiscale' (a sparse kernel of each cell's nearest "
                            "spots plus a far field): open_plan rebuilds plans from the dense cost and would not give "
                            "that result's plan; align with the dense kernel to explore the whole plan")


def _check_shapes(result: xr.Dataset, cells: ExpressionMatrix, spots: ExpressionMatrix, genes: pd.Index) -> None:
    """Refuse inputs that cannot be the result's, before anything is computed."""
    result_cells = pd.Index([str(c) for c in result["cell"].values])
    if cells.shape[0] != len(result_cells):
        raise SSAInputError(f"scRNA: {cells.shape[0]} cells, but the result is over {len(result_cells)} cells: not "
                            "the cells it was computed from")
    if not pd.Index(cells.names.astype(str)).equals(result_cells):
        differ = np.flatnonzero(np.asarray(cells.names.astype(str)) != np.asarray(result_cells))
        raise SSAInputError(f"scRNA: cell names differ from the result's ({differ.size} of {len(result_cells)}, first "
                            f"at row {differ[0]}: {cells.names[differ[0]]!r} vs {result_cells[differ[0]]!r}); pass the "
                            "cells in the result's order")
    n_spots = column_potential(result).size + int(result.attrs.get("n_spots_dropped", 0))
    if spots.shape[0] != n_spots:
        raise SSAInputError(f"spots: {spots.shape[0]} spots, but the result was computed on {n_spots}: not the spots "
                            "it was computed from")
    for matrix, role in ((cells, "scRNA"), (spots, "spots")):
        absent = genes.difference(matrix.genes)
        if absent.size:
            raise SSAInputError(f"{role}: {absent.size} of the result's {genes.size} genes are missing (e.g. "
                                f"{list(absent[:5])}): not the input the result was computed from")


def _build_plan(result: xr.Dataset, cells: ExpressionMatrix, spots: ExpressionMatrix, genes: pd.Index,
                executor: Executor, block_rows: int | None) -> TransportPlan:
    """Statistics of both inputs (as ``align`` computes them), the lazy cost and the potentials."""
    attrs = result.attrs
    marginals = str(attrs.get("marginals", "total"))
    inputs = _checked_inputs(cells, spots, executor, marginals, drop_empty=True)
    assigned = (np.asarray(result["assigned"].values, dtype=bool) if "assigned" in result
                else np.ones(cells.shape[0], dtype=bool))
    if not np.array_equal(inputs.kept_cells, np.flatnonzero(assigned)):
        raise SSAInputError("scRNA: the empty cells of the input are not the cells the result left unassigned: not the "
                            "cells it was computed from")
    g = column_potential(result)
    if inputs.kept_spots.size != g.size:
        raise SSAInputError(f"spots: {inputs.kept_spots.size} non-empty spots, but the result has potentials for "
                            f"{g.size}: not the spots it was computed from")
    kept_cells, kept_spots = inputs.cells, inputs.spots
    summary_c, summary_s = inputs.cell_summary, inputs.spot_summary
    cell_cols = kept_cells.genes.get_indexer(genes)
    spot_cols = kept_spots.genes.get_indexer(genes)
    cost = lazy_pearson_cost(summary_c.mean[cell_cols], summary_c.std[cell_cols], kept_spots.select_genes(genes).X,
                             summary_s.mean[spot_cols], summary_s.std[spot_cols])
    # The spot profiles (genes used x spots) are built once and held: on a cluster in a worker's
    # memory (recomputable from lineage), locally in this process; every pass then refers to them.
    if executor.distributed:
        cost = executor.client.persist(cost)
    else:
        (cost,) = executor.compute(cost)
    n_kept, m_kept = kept_cells.shape[0], kept_spots.shape[0]
    # The plan block is float64: size the blocks as align sizes a float32 block twice as wide.
    rows = block_rows or default_block_rows(n_kept, 2 * m_kept, genes.size, executor.n_threads(),
                                            kept_cells.X.chunks[0][0])
    totals = summary_c.row_totals
    p = np.full(totals.shape, 1.0 / totals.size) if marginals == "uniform" else totals / totals.sum()
    f = np.asarray(result["potential"].values, dtype=np.float64)[inputs.kept_cells]
    refinement = None
    if "refine_A" in result:
        refinement = (np.asarray(result["refine_A"].values, dtype=np.float64)[inputs.kept_spots],
                      np.asarray(result["refine_a"].values, dtype=np.float64)[inputs.kept_spots])
    return TransportPlan(cells=cells, kept_X=kept_cells.X, gene_columns=cell_cols, block_rows=rows, cost=cost, f=f, g=g,
                         eps=float(attrs["eps"]), p=p,
                         kept_cells=inputs.kept_cells, kept_spots=inputs.kept_spots, spot_names=spots.names,
                         spot_coords=spots.coords, executor=executor, refinement=refinement)


def _check_row_sums(plan: TransportPlan) -> None:
    """Row sums of a few blocks against the masses ``p``: the inputs are the result's, or a clear error."""
    bounds = np.cumsum((0, *plan.row_chunks))
    n_blocks = len(plan.row_chunks)
    picked = sorted({0, n_blocks // 2, n_blocks - 1})
    sizes = [min(CHECKED_ROWS, plan.row_chunks[i]) for i in picked]
    rows = np.concatenate([np.arange(bounds[i], bounds[i] + size) for i, size in zip(picked, sizes)])
    leading = tuple(min(CHECKED_ROWS, size) for size in plan.row_chunks)
    sums = da.map_blocks(_leading_row_sums, plan._cells_over_genes(), plan._f_column, dask.delayed(plan._g, pure=True),
                         plan._held_cost(), *plan._held_refinement(), eps=plan.eps, n_rows=CHECKED_ROWS, dtype=np.float64, chunks=(leading, (1,)),
                         meta=np.empty((0, 0), np.float64), token="ssa-plan-check")
    (row_sums,) = plan.executor.compute(sums.blocks[picked], label="checking the plan")
    p = plan._p[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        error = np.abs(row_sums[:, 0] / p - 1.0)
    bad = np.flatnonzero(~np.isfinite(error))
    worst = int(bad[0]) if bad.size else int(np.argmax(error))
    if bad.size or error[worst] > ROW_SUM_RTOL:
        cell = plan.cell_names[plan.kept_cells[rows[worst]]]
        raise SSAInputError(
            f"the plan recomputed from these inputs does not match the result: cell {cell!r} has row sum "
            f"{row_sums[worst, 0]:.6g} instead of its mass {p[worst]:.6g} (relative error {error[worst]:.2g} > "
            f"{ROW_SUM_RTOL:g}); pass the inputs, log1p, layers and gene key the result was computed with"
        )
    log.info("plan checked on %d cells: row sums match the masses to %.2g", rows.size, float(np.nanmax(error)))


# ---------------------------------------------------------------------- blockwise helpers


def _column(values: np.ndarray, chunks: tuple[int, ...]) -> da.Array:
    """A per-cell vector as an ``(n, 1)`` Dask array with the plan's row chunks."""
    return da.from_array(np.asarray(values, np.float64)[:, None], chunks=(chunks, (1,)))


def _row_chunked(values: Any, chunks: tuple[int, ...], n_rows: int) -> da.Array:
    """A per-kept-cell array as a Dask array with the plan's row chunks (one chunk across columns)."""
    if isinstance(values, da.Array):
        array = values
    elif sp.issparse(values):
        csr = sp.csr_matrix(values)
        if csr.shape[0] != n_rows:
            raise SSAInputError(f"expected {n_rows} rows (one per cell in the plan), got shape {csr.shape}")
        bounds = np.cumsum((0, *chunks))
        parts = [da.from_delayed(dask.delayed(csr[a:b]), shape=(b - a, csr.shape[1]), dtype=csr.dtype,
                                 meta=sp.csr_matrix((0, 0), dtype=csr.dtype)) for a, b in zip(bounds[:-1], bounds[1:])]
        return da.concatenate(parts, axis=0)
    else:
        array = np.asarray(values)
        array = array[:, None] if array.ndim == 1 else array
        return da.from_array(array, chunks=(chunks, (array.shape[1],)))
    if array.ndim == 1:
        array = array[:, None]
    if array.shape[0] != n_rows:
        raise SSAInputError(f"expected {n_rows} rows (one per cell in the plan), got shape {array.shape}")
    return array.rechunk((chunks, (array.shape[1],)))


def _take_rows_lazy(X: da.Array, kept: np.ndarray) -> da.Array:
    """Rows ``kept`` of a row-chunked Dask array, blockwise (CSR blocks stay CSR)."""
    keep = np.zeros(X.shape[0], dtype=bool)
    keep[kept] = True
    X = X.rechunk((X.chunks[0], (X.shape[1],)))
    bounds = np.cumsum((0, *X.chunks[0]))
    kept_chunks = tuple(int(keep[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:]))
    mask = da.from_array(keep[:, None], chunks=(X.chunks[0], (1,)))
    return X.map_blocks(_take_rows, mask, chunks=(kept_chunks, X.chunks[1]), dtype=X.dtype, meta=X._meta)


def plan_block(D: np.ndarray, f: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """``T = exp((f_i + g_j - D_ij) / eps)`` of one row block, float64.

    Parameters
    ----------
    D : (r, m) array
        Cost block (float32 as ``align`` computes it).
    f : (r,) array
        Row potentials of the block's cells.
    g : (m,) array
        Column potentials.
    eps : float
        Entropic regularisation.
    """
    T = np.asarray(D, dtype=np.float64) * -1.0
    T += g[None, :]
    T += np.asarray(f, np.float64)[:, None]
    T /= eps
    return np.exp(T, out=T)


def _refined_cost(X: Any, cost: PearsonCost, A: np.ndarray | None, a: np.ndarray | None) -> np.ndarray:
    """The cost of a block of cells: ``D``, plus ``X A^T - 1 a^T`` (float64) for a refined result."""
    D = cost.cost(X)
    return D if A is None else D + cost_increment(X, A, a)


def _leading_row_sums(X: Any, f: np.ndarray, g: np.ndarray, cost: PearsonCost, A: np.ndarray | None,
                      a: np.ndarray | None, eps: float, n_rows: int) -> np.ndarray:
    """Row sums of the plan for the first ``n_rows`` cells of a block (the cost of those rows only)."""
    return _row_sums(plan_block(_refined_cost(X[:n_rows], cost, A, a), f[:n_rows, 0], g, eps))


def _plan_task(func: Callable[..., np.ndarray], n_cell: int, flatten: bool, eps: float, D: np.ndarray,
               f: np.ndarray, *rest: Any) -> np.ndarray:
    """One block of a pass: recompute ``T`` from its cost block, apply ``func``, drop ``T``."""
    cell_blocks, g, spot_args = rest[:n_cell], rest[n_cell], rest[n_cell + 1:]
    out = np.asarray(func(plan_block(D, f[:, 0], g, eps), *cell_blocks, *spot_args), dtype=np.float64)
    return out.reshape(1, -1) if flatten else out


def normalize_rows(T: np.ndarray) -> np.ndarray:
    """Divide each row of a plan block by its sum, in place: the row-normalised plan ``P``."""
    T /= T.sum(axis=1, keepdims=True)
    return T


def _transpose_product(normalize: bool, T: np.ndarray, V: Any) -> np.ndarray:
    """``T^T V`` of one block, ``(m, k)``; sparse ``V`` stays sparse."""
    if normalize:
        T = normalize_rows(T)
    if sp.issparse(V):
        return np.asarray((sp.csr_matrix(V, dtype=np.float64).T @ T).T)
    return T.T @ np.asarray(V, dtype=np.float64)


def _product(normalize: bool, T: np.ndarray, V: np.ndarray) -> np.ndarray:
    """``T V`` of one block, ``(r, k)``."""
    if normalize:
        T = normalize_rows(T)
    return T @ V


def _row_sums(T: np.ndarray) -> np.ndarray:
    return T.sum(axis=1, keepdims=True)


def _column_sums(T: np.ndarray) -> np.ndarray:
    return T.sum(axis=0)


def _entropy(T: np.ndarray) -> np.ndarray:
    P = normalize_rows(T)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(P > 0, P * np.log(P), 0.0)
    return -terms.sum(axis=1, keepdims=True)


def _top_k(k: int, T: np.ndarray) -> np.ndarray:
    """Spot indices (as floats) and row-normalised weights of the ``k`` largest entries per row, largest first."""
    P = normalize_rows(T)
    top = top_k_columns(P, k)
    return np.concatenate([top.astype(np.float64), np.take_along_axis(P, top, axis=1)], axis=1)
