"""The plan's summary per cell and per spot, as one xarray Dataset, written to Zarr or into AnnData.

:func:`plan_summary` asks the lazy plan of :mod:`ssa_dask.plan` what users look at after an
alignment (each cell's top spot, its uncertainty and top-k spots; each spot's composition and
imputed genes), :func:`write_plan_summary` writes it to a Zarr store and/or into the cells' and
the spots' AnnData under a ``key_added`` prefix, matching cells and spots by name.

Keys written into AnnData (``key`` is ``key_added``):

cells (``adata_sc``)
    ``obs[f"{key}_spot"]`` (name of the top spot, categorical; missing for cells left out),
    ``obs[f"{key}_top_probability"]``, ``obs[f"{key}_entropy"]``, ``obs[f"{key}_expected_distance"]``
    (when the spots have coordinates); ``obsm[f"{key}_spatial"]`` and ``obsm["spatial"]`` (the top
    spot's coordinates, so ``sc.pl.embedding(adata, basis="spatial")`` works in one call);
    ``obsm[f"{key}_top_k"]`` (CSR cells x spots, the ``k`` largest weights of each cell's
    row-normalised plan) with its column names in ``uns[f"{key}_top_k_spots"]``.
spots (``adata_sp``)
    ``obsm[f"{key}_composition"]`` (fractions, spots x categories), ``obsm[f"{key}_expected_count"]``
    with the categories in ``uns[f"{key}_categories"]`` and ``obs[f"{key}_expected_cells"]``;
    ``obsm[f"{key}_imputed"]`` (spots x genes) with the genes in ``uns[f"{key}_imputed_genes"]``, and
    ``layers[f"{key}_imputed"]`` over ``var`` (NaN for genes not imputed) when some imputed genes
    are in ``var``.

Category and gene tables are NumPy arrays with their names in ``uns`` rather than DataFrames:
``.h5ad`` refuses column names with ``/`` (e.g. ``"Forebrain/Midbrain/Hindbrain"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr

from ssa_dask.errors import SSAInputError
from ssa_dask.explore import DEFAULT_BATCH_GENES, composition, impute, uncertainty
from ssa_dask.io import write_atomically
from ssa_dask.plan import TransportPlan

log = logging.getLogger(__name__)

#: Spots kept per cell in the top-k matrix by default.
DEFAULT_TOP_K = 5


def plan_summary(
    plan: TransportPlan,
    *,
    labels: Any = None,
    genes: Sequence[str] | None = None,
    top_k: int = DEFAULT_TOP_K,
    batch_genes: int = DEFAULT_BATCH_GENES,
) -> xr.Dataset:
    """Per-cell and per-spot summary of a plan: uncertainty, top-k, composition, imputed genes.

    One pass over the plan for the uncertainty, one for the top-k, one for the composition (with
    ``labels``) and one per batch of ``genes``.

    Parameters
    ----------
    plan : TransportPlan
        From :func:`ssa_dask.open_plan`.
    labels : array-like or pandas.Series, optional
        One category per cell (as for :func:`ssa_dask.composition`); none: no composition.
    genes : sequence of str, optional
        scRNA genes to impute at the spots (as for :func:`ssa_dask.impute`); none: no imputation.
    top_k : int
        Spots kept per cell in ``top_k_spot``/``top_k_probability`` (at most the number of spots).
    batch_genes : int
        Genes imputed per pass.

    Returns
    -------
    xarray.Dataset
        Over ``cell``: ``spot_index`` (-1 for cells left out), ``spot_name`` ("" for those),
        ``top_probability``, ``entropy``, ``expected_distance`` and ``assigned_position``
        (``(cell, xy)``, NaN for cells left out) when the spots have coordinates; over
        ``(cell, rank)``: ``top_k_spot`` and ``top_k_probability`` (see :func:`top_k_matrix`);
        over ``spot``: ``position`` (``(spot, xy)``) when known; ``expected_count`` and
        ``fraction`` over ``(spot, category)`` with ``labels``; ``imputed`` over ``(spot, gene)``
        with ``genes``.
    """
    n_spots = plan.shape[1]
    if not 1 <= int(top_k) <= n_spots:
        raise SSAInputError(f"top_k must be between 1 and the number of spots ({n_spots}), got {top_k}")
    spot_names = np.asarray(plan.spot_names.astype(str), dtype=object)
    sure = uncertainty(plan)
    top = sure["top_spot"].values
    assigned = top >= 0
    data: dict[str, Any] = {
        "spot_index": ("cell", top),
        "spot_name": ("cell", np.where(assigned, spot_names[np.maximum(top, 0)], "").astype(object)),
        "top_probability": ("cell", sure["top_probability"].values),
        "entropy": ("cell", sure["entropy"].values),
    }
    if "expected_distance" in sure:
        data["expected_distance"] = ("cell", sure["expected_distance"].values)
    if plan.spot_coords is not None:
        coords = np.asarray(plan.spot_coords, dtype=np.float64)
        position = np.where(assigned[:, None], coords[np.maximum(top, 0)], np.nan)
        data["assigned_position"] = (("cell", "xy"), position)
        data["position"] = (("spot", "xy"), coords)
    spots_k, weights_k = _top_k_columns(plan.top_k(int(top_k)), int(top_k))
    data["top_k_spot"] = (("cell", "rank"), spots_k)
    data["top_k_probability"] = (("cell", "rank"), weights_k)
    summary = xr.Dataset(data, coords={"cell": np.asarray(plan.cell_names.astype(str), dtype=object),
                                       "spot": spot_names, "rank": np.arange(int(top_k)), "xy": ["x", "y"]})
    if labels is not None:
        summary = summary.merge(composition(plan, labels).assign_coords(spot=spot_names))
    if genes is not None:
        imputed = impute(plan, genes=genes, batch_genes=batch_genes).assign_coords(spot=spot_names)
        summary["imputed"] = imputed
    for name, text in _DESCRIPTIONS.items():
        if name in summary:
            summary[name].attrs["description"] = text
    summary.attrs.update(eps=plan.eps, top_k=int(top_k))
    return summary


_DESCRIPTIONS = {
    "spot_index": "row of the spot input of the cell's top spot (-1: cell left out of the plan)",
    "spot_name": "name of the cell's top spot",
    "top_probability": "row-normalised plan at the top spot",
    "entropy": "Shannon entropy (nats) of the cell's row-normalised plan",
    "expected_distance": "plan-weighted mean distance from the top spot",
    "assigned_position": "coordinates of the cell's top spot",
    "top_k_spot": "rows of the spot input of the cell's k largest plan weights, largest first (-1: none)",
    "top_k_probability": "row-normalised plan at those spots",
    "position": "spot coordinates",
}


def top_k_matrix(summary: xr.Dataset) -> sp.csr_matrix:
    """The summary's top-k weights as a sparse cells x spots CSR matrix.

    Parameters
    ----------
    summary : xarray.Dataset
        From :func:`plan_summary` or :func:`read_plan_summary`.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n_cells, n_spots)``: ``top_k_probability`` at ``top_k_spot``; no entries for cells left out.
    """
    spots = np.asarray(summary["top_k_spot"].values, dtype=np.int64)
    weights = np.asarray(summary["top_k_probability"].values, dtype=np.float64)
    rows = np.repeat(np.arange(spots.shape[0]), spots.shape[1]).reshape(spots.shape)
    keep = spots >= 0
    shape = (summary.sizes["cell"], summary.sizes["spot"])
    return sp.csr_matrix((weights[keep], (rows[keep], spots[keep])), shape=shape)


def write_plan_summary(
    plan: TransportPlan | xr.Dataset,
    path: str | os.PathLike | None = None,
    *,
    adata_sc: Any = None,
    adata_sp: Any = None,
    key_added: str = "ssa",
    spatial_key: str | None = "spatial",
    overwrite: bool = False,
    **summary_options: Any,
) -> xr.Dataset:
    """Write the summary of a plan to a Zarr store and/or into the cells' and the spots' AnnData.

    Parameters
    ----------
    plan : TransportPlan or xarray.Dataset
        An open plan (its summary is computed with ``summary_options``) or a summary already made
        by :func:`plan_summary`.
    path : str or path-like, optional
        Zarr store to write (written aside and renamed into place; Zarr format 2, consolidated).
    adata_sc : anndata.AnnData, optional
        Cells to annotate in place (see the module's key list); matched to the plan's cells by
        ``obs_names`` (any order; a subset is allowed).
    adata_sp : anndata.AnnData, optional
        Spots to annotate in place, matched by ``obs_names``.
    key_added : str
        Prefix of every key written.
    spatial_key : str or None
        Also write the top spot's coordinates to ``adata_sc.obsm[spatial_key]`` (``None``: only
        ``obsm[f"{key_added}_spatial"]``).  An existing entry is replaced, with a log message.
    overwrite : bool
        Replace an existing store at ``path``.
    **summary_options
        ``labels``, ``genes``, ``top_k``, ``batch_genes`` for :func:`plan_summary` (only with a plan).

    Returns
    -------
    xarray.Dataset
        The summary.

    Raises
    ------
    SSAInputError
        Cells or spots of the AnnData that are not in the plan, or repeated names; nothing is
        written then.
    OutputExistsError
        ``path`` exists and ``overwrite`` is false.
    """
    if isinstance(plan, xr.Dataset):
        if summary_options:
            raise SSAInputError(f"summary options {sorted(summary_options)} need a plan, not a summary")
        summary = plan
    else:
        summary = plan_summary(plan, **summary_options)
    # Every name is matched before anything is written.
    cell_rows = spot_rows = None
    if adata_sc is not None:
        cell_rows = _rows_by_name(adata_sc.obs_names, summary["cell"].values, "adata_sc", "cells")
    if adata_sp is not None:
        spot_rows = _rows_by_name(adata_sp.obs_names, summary["spot"].values, "adata_sp", "spots")
    if path is not None:
        write_atomically(path, lambda tmp: summary.to_zarr(str(tmp), mode="w", consolidated=True, zarr_format=2),
                         overwrite=overwrite)
    if adata_sc is not None:
        _write_cells(summary, adata_sc, cell_rows, key_added, spatial_key)
    if adata_sp is not None:
        _write_spots(summary, adata_sp, spot_rows, key_added)
    return summary


def read_plan_summary(path: str | os.PathLike) -> xr.Dataset:
    """Open a summary written by :func:`write_plan_summary` lazily."""
    return xr.open_zarr(str(path), consolidated=True)


# ---------------------------------------------------------------------- into AnnData


def _write_cells(summary: xr.Dataset, adata: Any, rows: np.ndarray, key: str, spatial_key: str | None) -> list[str]:
    spot_name = pd.Series(np.asarray(summary["spot_name"].values[rows]).astype(object))
    written = []

    def obs(name: str, values: Any) -> None:
        adata.obs[f"{key}_{name}"] = values
        written.append(f"obs[{key + '_' + name!r}]")

    obs("spot", pd.Categorical(spot_name.where(spot_name != "").to_numpy()))
    for name in ("top_probability", "entropy", "expected_distance"):
        if name in summary:
            obs(name, np.asarray(summary[name].values[rows], dtype=np.float64))
    if "assigned_position" in summary:
        position = np.asarray(summary["assigned_position"].values[rows], dtype=np.float64)
        adata.obsm[f"{key}_spatial"] = position
        written.append(f"obsm[{key + '_spatial'!r}]")
        if spatial_key is not None:
            if spatial_key in adata.obsm:
                log.info("replacing adata_sc.obsm[%r] with the assigned spots' coordinates", spatial_key)
            adata.obsm[spatial_key] = position.copy()
            written.append(f"obsm[{spatial_key!r}]")
    adata.obsm[f"{key}_top_k"] = top_k_matrix(summary)[rows]
    adata.uns[f"{key}_top_k_spots"] = np.asarray(_names(summary["spot"].values), dtype=object)
    written += [f"obsm[{key + '_top_k'!r}]", f"uns[{key + '_top_k_spots'!r}]"]
    log.info("cells: added %s", ", ".join(written))
    return written


def _write_spots(summary: xr.Dataset, adata: Any, rows: np.ndarray, key: str) -> list[str]:
    written = []
    if "fraction" in summary:
        adata.obsm[f"{key}_composition"] = np.asarray(summary["fraction"].values[rows], dtype=np.float64)
        counts = np.asarray(summary["expected_count"].values[rows], dtype=np.float64)
        adata.obsm[f"{key}_expected_count"] = counts
        adata.obs[f"{key}_expected_cells"] = counts.sum(axis=1)
        adata.uns[f"{key}_categories"] = np.asarray(_names(summary["category"].values), dtype=object)
        written += [f"obsm[{key + '_composition'!r}]", f"obsm[{key + '_expected_count'!r}]",
                    f"obs[{key + '_expected_cells'!r}]", f"uns[{key + '_categories'!r}]"]
    if "imputed" in summary:
        imputed = np.asarray(summary["imputed"].values[rows], dtype=np.float64)
        genes = _names(summary["gene"].values)
        adata.obsm[f"{key}_imputed"] = imputed
        adata.uns[f"{key}_imputed_genes"] = np.asarray(genes, dtype=object)
        written += [f"obsm[{key + '_imputed'!r}]", f"uns[{key + '_imputed_genes'!r}]"]
        columns = pd.Index(adata.var_names.astype(str)).get_indexer(genes)
        if (columns >= 0).any():
            layer = np.full(adata.shape, np.nan)
            layer[:, columns[columns >= 0]] = imputed[:, columns >= 0]
            adata.layers[f"{key}_imputed"] = layer
            written.append(f"layers[{key + '_imputed'!r}]")
    log.info("spots: added %s", ", ".join(written) if written else "nothing (no labels, no genes)")
    return written


def _rows_by_name(names: pd.Index, available: np.ndarray, what: str, role: str) -> np.ndarray:
    """Row of ``available`` for each of ``names``, or an error naming the names that are not there."""
    names = pd.Index(names.astype(str))
    if names.has_duplicates:
        raise SSAInputError(f"{what}: repeated obs_names {list(names[names.duplicated()].unique()[:5])}: {role} are "
                            "matched by name; make them unique first")
    rows = _names(available).get_indexer(names)
    if (rows < 0).any():
        missing = names[rows < 0]
        raise SSAInputError(f"{what}: {missing.size} of {names.size} {role} are not in the plan (e.g. "
                            f"{list(missing[:5])}); {role} are matched by obs_names")
    return rows


def _names(values: Any) -> pd.Index:
    """Names as a pandas Index of ``str`` (from object, fixed-width or ``StringDType`` arrays, as Zarr gives)."""
    return pd.Index(np.asarray(values).astype(object)).astype(str)


def _top_k_columns(matrix: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Spot indices and weights of each row of a top-k CSR matrix, largest first (-1/NaN padding)."""
    matrix = sp.csr_matrix(matrix)
    n = matrix.shape[0]
    entry_rows = np.repeat(np.arange(n), np.diff(matrix.indptr))
    order = np.lexsort((-matrix.data, entry_rows))
    rows = entry_rows[order]
    rank = np.arange(order.size) - matrix.indptr[rows]
    keep = rank < k
    spots = np.full((n, k), -1, dtype=np.int64)
    weights = np.full((n, k), np.nan)
    spots[rows[keep], rank[keep]] = matrix.indices[order][keep]
    weights[rows[keep], rank[keep]] = matrix.data[order][keep]
    return spots, weights
