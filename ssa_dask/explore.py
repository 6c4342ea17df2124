"""What users do after an alignment, one call each, from the lazy plan of :mod:`ssa_dask.plan`.

- :func:`composition`: cell-type composition of every spot (Tangram's ``project_cell_annotations``);
- :func:`impute`: expression of any scRNA gene at every spot, in batches of genes;
- :func:`heldout_gene_check`: leave genes out of the spots, align, impute them, correlate;
- :func:`uncertainty`: per cell, entropy of its plan, weight of its top spot, expected distance.

Each is one pass (``impute``: one per batch of genes) over row blocks of the plan; nothing of
size cells x spots, or genes x spots x cells, is ever held.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr

from ssa_dask.cluster import connect
from ssa_dask.errors import SSAInputError
from ssa_dask.io import ExpressionMatrix, read_expression
from ssa_dask.plan import TransportPlan, normalize_rows, open_plan

#: Genes imputed per pass over the plan by default: the pass's cost is dominated by recomputing the
#: cost blocks, so larger batches are cheaper per gene; each task holds ``spots x batch`` float64.
DEFAULT_BATCH_GENES = 256


def composition(plan: TransportPlan, labels: Any) -> xr.Dataset:
    """Expected composition of every spot in cell categories (e.g. cell types), in one pass.

    Each cell is spread over the spots by its row-normalised plan ``P_ij = T_ij / sum_l T_il``, so
    ``expected_count[j, c] = sum_{i in c} P_ij`` is the expected number of cells of category ``c``
    at spot ``j`` (Tangram's ``project_cell_annotations``), and ``fraction`` is that count over the
    spot's expected number of cells.

    Parameters
    ----------
    plan : TransportPlan
        From :func:`ssa_dask.open_plan`.
    labels : array-like or pandas.Series
        One category per input cell: in cell order, or a Series indexed by cell name (matched by
        name).  Missing labels (NaN/None) leave the cell out.  A ``pandas.Categorical`` keeps its
        category order; otherwise categories are sorted.

    Returns
    -------
    xarray.Dataset
        ``expected_count`` and ``fraction`` over ``(spot, category)``; spots left out of the plan
        (``drop_empty``) have count 0 and fraction NaN.
    """
    codes, categories = _label_codes(plan, labels)
    n_categories = len(categories)
    kept_codes = codes[plan.kept_cells].astype(np.int32)
    counts = plan.map_row_blocks(_category_mass, kept_codes, spot_arrays=[n_categories], reduce="sum",
                                 width=plan.kept_spots.size * n_categories, label="composition")
    counts = plan.expand_spots(counts.reshape(plan.kept_spots.size, n_categories))
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = counts / counts.sum(axis=1, keepdims=True)
    coords = {"spot": np.asarray(plan.spot_names, dtype=object), "category": np.asarray(categories, dtype=object)}
    ds = xr.Dataset({"expected_count": (("spot", "category"), counts), "fraction": (("spot", "category"), fraction)},
                    coords=coords)
    ds["expected_count"].attrs["description"] = "expected number of cells of the category at the spot"
    ds["fraction"].attrs["description"] = "expected share of the spot's cells in the category"
    return ds


def impute(
    plan: TransportPlan,
    cells: Any = None,
    genes: Sequence[str] | None = None,
    *,
    batch_genes: int = DEFAULT_BATCH_GENES,
    layer: str | None = None,
    gene_key: str | None = None,
    log1p: bool = False,
) -> xr.DataArray:
    """Expression of scRNA genes at every spot: the plan-weighted mean of the cells sent there.

    ``imputed[j, g] = sum_i T_ij x_ig / sum_i T_ij``, batch by batch of genes: each batch is one
    pass over the plan's row blocks, holding ``spots x batch`` values per task; the result is
    ``spots x genes`` (multiply by :meth:`TransportPlan.column_marginal` for plan-weighted sums).

    Parameters
    ----------
    plan : TransportPlan
        From :func:`ssa_dask.open_plan`.
    cells : optional
        Cells x genes to impute from, the plan's cells in the same order (any input of
        :func:`ssa_dask.read_expression`, e.g. another layer with every gene); default: the cells
        the plan was opened with.
    genes : sequence of str, optional
        Genes to impute (default: every gene of ``cells``).
    batch_genes : int
        Genes per pass.
    layer, gene_key, log1p
        How to read ``cells`` (as for :func:`ssa_dask.read_expression`); ignored when ``cells`` is None.

    Returns
    -------
    xarray.DataArray
        ``(spot, gene)`` float64, NaN for spots left out of the plan.
    """
    if batch_genes < 1:
        raise SSAInputError(f"batch_genes must be at least 1, got {batch_genes}")
    matrix = plan.cells if cells is None else read_expression(cells, layer=layer, gene_key=gene_key, log1p=log1p,
                                                                 role="scRNA")
    _check_same_cells(plan, matrix)
    wanted = matrix.genes if genes is None else pd.Index([str(g) for g in genes])
    absent = wanted.difference(matrix.genes)
    if absent.size:
        raise SSAInputError(f"scRNA: genes to impute not in the cells: {list(absent[:5])} ({absent.size} in all)")
    if wanted.has_duplicates:
        raise SSAInputError(f"genes to impute repeat: {list(wanted[wanted.duplicated()].unique()[:5])}")
    n_spots = plan.kept_spots.size
    columns = []
    for start in range(0, wanted.size, batch_genes):
        batch = wanted[start : start + batch_genes]
        X = plan.kept_rows(matrix.select_genes(batch).X)
        sums = plan.map_row_blocks(_weighted_sums, X, reduce="sum", width=n_spots * (batch.size + 1),
                                   label=f"impute genes {start + 1}-{start + batch.size} of {wanted.size}")
        sums = sums.reshape(n_spots, batch.size + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            columns.append(sums[:, :-1] / sums[:, -1:])
    values = plan.expand_spots(np.concatenate(columns, axis=1), fill=np.nan)
    coords = {"spot": np.asarray(plan.spot_names, dtype=object), "gene": np.asarray(wanted, dtype=object)}
    out = xr.DataArray(values, dims=("spot", "gene"), name="imputed", coords=coords)
    out.attrs["description"] = "plan-weighted mean expression of the cells at the spot"
    return out


def uncertainty(plan: TransportPlan) -> xr.Dataset:
    """How sure the plan is of each cell's place, in one pass.

    Returns
    -------
    xarray.Dataset
        Over ``cell``: ``entropy`` (nats) of the row-normalised plan (0: one spot; ``log n_spots``:
        spread evenly), ``top_spot`` (index of the spot of largest weight), ``top_probability`` (its
        weight) and, when the spots have coordinates, ``expected_distance``: the plan-weighted mean
        distance from the top spot to the cell's spots, in the coordinates' unit.  Cells left out
        of the plan have NaN (``top_spot`` -1).
    """
    coords = plan.spot_coords
    spot_arrays = [] if coords is None else [np.asarray(coords, np.float64)[plan.kept_spots]]
    width = 3 if coords is None else 4
    values = plan.map_row_blocks(_cell_uncertainty, spot_arrays=spot_arrays, reduce="rows", width=width,
                                 label="uncertainty")
    values = plan.expand_cells(values, fill=np.nan)
    top = np.full(plan.shape[0], -1, dtype=np.int64)
    kept = np.isfinite(values[:, 1])
    top[kept] = plan.kept_spots[values[kept, 1].astype(np.int64)]
    data = {"entropy": ("cell", values[:, 0]), "top_spot": ("cell", top), "top_probability": ("cell", values[:, 2])}
    if coords is not None:
        data["expected_distance"] = ("cell", values[:, 3])
    ds = xr.Dataset(data, coords={"cell": np.asarray(plan.cell_names, dtype=object)})
    ds["entropy"].attrs["description"] = "Shannon entropy (nats) of the cell's row-normalised plan"
    ds["top_probability"].attrs["description"] = "row-normalised plan at the top spot"
    if coords is not None:
        ds["expected_distance"].attrs["description"] = "plan-weighted mean distance from the top spot"
    return ds


def heldout_gene_check(
    cells: Any,
    spots: Any,
    genes: Sequence[str],
    *,
    client: Any = None,
    log1p: bool = False,
    sc_layer: str | None = None,
    spots_layer: str | None = None,
    gene_key: str | None = None,
    batch_genes: int = DEFAULT_BATCH_GENES,
    **align_options: Any,
) -> xr.Dataset:
    """Leave ``genes`` out of the spots, align, impute them from the cells and correlate with the measured spots.

    The spots lose the held-out genes before :func:`ssa_dask.align` sees them (so the genes are
    neither in the cost nor in the spot masses); the cells keep every gene.

    Parameters
    ----------
    cells, spots
        As for :func:`ssa_dask.align`.
    genes : sequence of str
        Genes to hold out; each must be in both inputs.
    client
        As for :func:`ssa_dask.align`; one backend serves the alignment and the imputation.
    log1p, sc_layer, spots_layer, gene_key
        How to read the inputs, as for :func:`ssa_dask.align`.
    batch_genes : int
        Genes per imputation pass.
    **align_options
        Passed to :func:`ssa_dask.align` (``n_genes``, ``lam``, ``drop_empty``...).

    Returns
    -------
    xarray.Dataset
        ``correlation`` over ``gene`` (Pearson over spots of imputed vs measured; NaN for a gene
        constant in either), ``imputed`` and ``measured`` over ``(spot, gene)``; attrs
        ``median_correlation``, ``n_genes_used`` and ``eps`` of the alignment.
    """
    from ssa_dask.align import align

    cell_matrix = read_expression(cells, layer=sc_layer, gene_key=gene_key, log1p=log1p, role="scRNA")
    spot_matrix = read_expression(spots, layer=spots_layer, gene_key=gene_key, log1p=log1p, role="spots")
    held = pd.Index([str(g) for g in genes])
    if held.empty:
        raise SSAInputError("no genes to hold out")
    for matrix, role in ((cell_matrix, "scRNA"), (spot_matrix, "spots")):
        absent = held.difference(matrix.genes)
        if absent.size:
            raise SSAInputError(f"{role}: held-out genes not in the input: {list(absent[:5])} ({absent.size} in all)")
    training_spots = spot_matrix.select_genes(spot_matrix.genes.difference(held, sort=False))
    with connect(client) as executor, _quiet_missing_genes():
        result = align(cell_matrix, training_spots, client=executor.client, **align_options)
        with open_plan(result, cell_matrix, training_spots, client=executor.client, log1p=False) as plan:
            imputed = impute(plan, genes=held, batch_genes=batch_genes)
        (measured,) = executor.compute(spot_matrix.select_genes(held).X)
    measured = measured.toarray() if sp.issparse(measured) else np.asarray(measured, dtype=np.float64)
    correlation = column_correlation(imputed.values, measured)
    spot_gene = {"spot": imputed["spot"].values, "gene": np.asarray(held, dtype=object)}
    ds = xr.Dataset({"correlation": ("gene", correlation), "imputed": (("spot", "gene"), imputed.values),
                     "measured": (("spot", "gene"), measured)}, coords=spot_gene)
    ds["correlation"].attrs["description"] = "Pearson correlation over spots of the imputed and the measured gene"
    ds.attrs.update(median_correlation=float(np.nanmedian(correlation)) if np.isfinite(correlation).any() else np.nan,
                    n_genes_used=int(result.attrs["n_genes_used"]), eps=float(result.attrs["eps"]))
    return ds


# ---------------------------------------------------------------------- helpers


class _MissingGenesFilter(logging.Filter):
    """Drop the gene selection's warning about genes absent from the spots: held-out genes are absent on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "not in the spots" not in str(record.msg)


@contextlib.contextmanager
def _quiet_missing_genes() -> Iterator[None]:
    gene_log = logging.getLogger("ssa_dask.genes")
    quiet = _MissingGenesFilter()
    gene_log.addFilter(quiet)
    try:
        yield
    finally:
        gene_log.removeFilter(quiet)


def _check_same_cells(plan: TransportPlan, matrix: ExpressionMatrix) -> None:
    if matrix.shape[0] != plan.shape[0]:
        raise SSAInputError(f"scRNA: {matrix.shape[0]} cells, but the plan is over {plan.shape[0]}: not the plan's "
                            "cells")
    if not pd.Index(matrix.names.astype(str)).equals(pd.Index(plan.cell_names.astype(str))):
        raise SSAInputError("scRNA: the cells' names differ from the plan's: pass the plan's cells in the same order")


def _label_codes(plan: TransportPlan, labels: Any) -> tuple[np.ndarray, list[Any]]:
    """Integer category codes per input cell (-1: no label) and the categories."""
    if isinstance(labels, pd.Series) and not isinstance(labels.index, pd.RangeIndex):
        index = pd.Index(labels.index.astype(str))
        missing = pd.Index(plan.cell_names.astype(str)).difference(index)
        if missing.size:
            raise SSAInputError(f"labels: no label for {missing.size} cell(s) of the plan, e.g. {list(missing[:5])}")
        labels = labels.set_axis(index).reindex(plan.cell_names.astype(str))
    values = labels.array if isinstance(labels, pd.Series) else labels
    if len(values) != plan.shape[0]:
        raise SSAInputError(f"labels: {len(values)} labels for {plan.shape[0]} cells")
    categorical = values if isinstance(values, pd.Categorical) else pd.Categorical(np.asarray(values, dtype=object))
    if len(categorical.categories) == 0:
        raise SSAInputError("labels: every label is missing")
    return np.asarray(categorical.codes, dtype=np.int64), list(categorical.categories)


def _category_mass(T: np.ndarray, codes: np.ndarray, n_categories: int) -> np.ndarray:
    """``sum_{i in c} P_ij`` of one block, ``(m, C)``."""
    P = normalize_rows(T)
    codes = np.asarray(codes).ravel()
    labelled = np.flatnonzero(codes >= 0)
    onehot = sp.csr_matrix((np.ones(labelled.size), (labelled, codes[labelled])), shape=(P.shape[0], n_categories))
    return np.asarray((onehot.T @ P).T)


def _weighted_sums(T: np.ndarray, X: Any) -> np.ndarray:
    """``[T^T X | T^T 1]`` of one block, ``(m, k + 1)``."""
    column_sums = T.sum(axis=0)[:, None]
    if sp.issparse(X):
        sums = np.asarray((sp.csr_matrix(X, dtype=np.float64).T @ T).T)
    else:
        sums = T.T @ np.asarray(X, dtype=np.float64)
    return np.concatenate([sums, column_sums], axis=1)


def _cell_uncertainty(T: np.ndarray, coords: np.ndarray | None = None) -> np.ndarray:
    """Entropy, top spot, top weight (and expected distance from the top spot) of each row."""
    P = normalize_rows(T)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(P > 0, P * np.log(P), 0.0).sum(axis=1)
    top = P.argmax(axis=1)
    columns = [entropy, top.astype(np.float64), P[np.arange(P.shape[0]), top]]
    if coords is not None:
        distance = np.hypot(coords[None, :, 0] - coords[top, 0][:, None], coords[None, :, 1] - coords[top, 1][:, None])
        columns.append(np.einsum("ij,ij->i", P, distance))
    return np.stack(columns, axis=1)


def column_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns over the rows where ``a`` is finite.

    The score of :func:`heldout_gene_check` (``a`` imputed, ``b`` measured, spots x genes); the
    benchmarks score peers' imputations with it too.
    """
    a = np.asarray(a, np.float64)
    keep = np.isfinite(a).all(axis=1)
    a, b = a[keep], np.asarray(b, np.float64)[keep]
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
