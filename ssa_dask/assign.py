"""From the solved plan to per-cell assignments: argmax, top-k, probabilities, as xarray.

The plan ``T = diag(a) K diag(b)`` is never formed: row ``i``'s largest entries are those of
``K_ij b_j`` and the row-normalised weights are ``K_ij b_j / sum_l K_il b_l``; one pass over the
kernel blocks gives them for every cell.

The result is a tidy xarray Dataset: per-cell variables over ``cell`` (and ``rank``), per-spot
variables over ``spot_id`` (``column_potential``, ``spot_xy``, ``spot_kept``), the genes left out
as coordinates over their own dimensions, and only JSON scalars in ``attrs``.  It is written to
Zarr in chunks of 100,000 cells with consolidated metadata, and opened lazily by
:func:`open_result` (or plain ``xr.open_zarr``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import dask
import numpy as np
import pandas as pd
import xarray as xr

from ssa_dask.errors import SSAInputError


#: Dimension of the per-spot variables.  Its index coordinate holds the spot names, like ``cell``
#: holds the cell names; it cannot be called ``spot``, which stays the per-cell assigned-spot index.
SPOT_DIM = "spot_id"
#: Cells per Zarr chunk of a written result (per-cell variables are a few bytes a cell, so a chunk
#: holds a few MB); spots are chunked the same way.
CELL_CHUNK = 100_000
SPOT_CHUNK = 100_000


def assignment_dataset(
    top_spot: np.ndarray,
    top_probability: np.ndarray,
    cell_names: pd.Index,
    spot_names: pd.Index,
    spot_coords: np.ndarray | None,
    f: np.ndarray | None = None,
    attrs: dict[str, Any] | None = None,
    *,
    g: np.ndarray | None = None,
    genes_missing_in_spots: Sequence[str] = (),
    genes_constant: Sequence[str] = (),
) -> xr.Dataset:
    """Assemble the result: per-cell assignments and per-spot quantities.

    Parameters
    ----------
    top_spot : (n_cells, k) int array
        Spot indices by decreasing plan weight.
    top_probability : (n_cells, k) array
        Row-normalised plan weight of those spots.
    cell_names, spot_names : pandas.Index
        Row names of the two matrices.
    spot_coords : (n_spots, 2) array or None
        Spot coordinates, kept per spot and copied for each cell's assigned spot.
    f : (n_cells,) array, optional
        Row potential of the solution (kept for warm starts and diagnostics).
    attrs : dict, optional
        Run record (lam, eps, iterations, error...): scalars only, JSON-friendly.
    g : (n_spots,) array, optional
        Column potential of the solution (``column_potential`` over the spots).
    genes_missing_in_spots, genes_constant : sequence of str
        Top-variance genes left out, each list kept as a coordinate over its own dimension.

    Returns
    -------
    xarray.Dataset
        Over ``cell``: ``spot`` (index of the assigned spot), ``spot_name``, ``probability``,
        ``spot_x``/``spot_y`` when coordinates are known, ``potential`` (``f``); over
        ``(cell, rank)``: ``top_spot``, ``top_probability``.  Over ``spot_id`` (coordinate: the spot
        names, in the order ``spot`` indexes): ``column_potential`` (``g``), ``spot_xy`` over
        ``(spot_id, xy)``, ``spot_kept``.  Coordinates ``gene_missing_in_spots`` and
        ``gene_constant`` over their own dimensions.
    """
    best = top_spot[:, 0]
    data: dict[str, Any] = {
        "spot": ("cell", best.astype(np.int64)),
        "spot_name": ("cell", np.asarray(spot_names, dtype=object)[best]),
        "probability": ("cell", top_probability[:, 0]),
        "top_spot": (("cell", "rank"), top_spot.astype(np.int64)),
        "top_probability": (("cell", "rank"), top_probability),
        "spot_kept": (SPOT_DIM, np.ones(len(spot_names), dtype=bool)),
    }
    if spot_coords is not None:
        data["spot_x"] = ("cell", spot_coords[best, 0])
        data["spot_y"] = ("cell", spot_coords[best, 1])
        data["spot_xy"] = ((SPOT_DIM, "xy"), np.asarray(spot_coords[:, :2], dtype=np.float64))
    if f is not None:
        data["potential"] = ("cell", f)
    if g is not None:
        data["column_potential"] = (SPOT_DIM, np.asarray(g, dtype=np.float64))
    coords = {
        "cell": np.asarray(cell_names, dtype=object),
        "rank": np.arange(top_spot.shape[1]),
        SPOT_DIM: np.asarray(spot_names, dtype=object),
        "gene_missing_in_spots": _strings(genes_missing_in_spots),
        "gene_constant": _strings(genes_constant),
    }
    if spot_coords is not None:
        coords["xy"] = np.array(["x", "y"], dtype=object)
    ds = xr.Dataset(data, coords=coords)
    ds["probability"].attrs["description"] = "row-normalised transport plan at the assigned spot"
    ds["spot"].attrs["description"] = f"index of the assigned spot (row of the spot matrix, position along {SPOT_DIM})"
    ds["spot_kept"].attrs["description"] = "False for spots left out as empty (drop_empty): no cell goes there"
    if g is not None:
        ds["column_potential"].attrs["description"] = "Sinkhorn column potential g (NaN for spots left out)"
    ds.attrs.update(attrs or {})
    return ds


def _strings(values: Sequence[str]) -> np.ndarray:
    """Names as a variable-width string array (an empty one stays a string array through Zarr)."""
    return np.asarray([str(v) for v in values], dtype=np.dtypes.StringDType())


def spots_over_input(ds: xr.Dataset, kept_spots: np.ndarray, n_spots_input: int,
                     dropped_spot_names: Sequence[str]) -> xr.Dataset:
    """The per-spot variables over every input spot, when some were left out of the problem.

    ``ds`` holds them over the ``kept_spots`` (positions in the input spot matrix); the others get
    their names from ``dropped_spot_names`` (in input order), ``spot_kept`` False and NaN potential
    and coordinates.  Per-cell variables are returned unchanged.
    """
    if kept_spots.size == n_spots_input:
        return ds
    dropped = np.setdiff1d(np.arange(n_spots_input), kept_spots)
    names = np.empty(n_spots_input, dtype=object)
    names[kept_spots] = ds[SPOT_DIM].values
    names[dropped] = list(dropped_spot_names)
    per_spot = [name for name, var in ds.data_vars.items() if SPOT_DIM in var.dims]
    expanded = {}
    for name in per_spot:
        values = ds[name].values
        fill: Any = False if values.dtype == bool else np.nan
        full = np.full((n_spots_input, *values.shape[1:]), fill, dtype=values.dtype)
        full[kept_spots] = values
        expanded[name] = (ds[name].dims, full, ds[name].attrs)
    return ds.drop_vars([*per_spot, SPOT_DIM]).assign_coords({SPOT_DIM: names}).assign(expanded)


def column_potential(result: xr.Dataset) -> np.ndarray:
    """The Sinkhorn column potential ``g`` of a result, over the spots of the transport problem.

    Reads the current layout (variable ``column_potential`` over ``spot_id``; spots left out by
    ``drop_empty`` are skipped) and the earlier one (a list in ``attrs["column_potential"]``, over
    the kept spots already).  The values are what ``align(..., init_g=...)`` accepts.

    Parameters
    ----------
    result : xarray.Dataset
        Output of :func:`ssa_dask.align` or :func:`open_result`.

    Returns
    -------
    numpy.ndarray
        ``(n_spots_kept,)`` float64.

    Raises
    ------
    SSAInputError
        The dataset holds no column potential (not an SSA result).
    """
    if "column_potential" in result.data_vars:
        g = np.asarray(result["column_potential"].values, dtype=np.float64)
        if "spot_kept" in result.data_vars:
            g = g[np.asarray(result["spot_kept"].values, dtype=bool)]
        return g
    if "column_potential" in result.attrs:
        return np.asarray(result.attrs["column_potential"], dtype=np.float64)
    raise SSAInputError("this dataset has no column potential (variable or attribute 'column_potential'); "
                        "is it a result of ssa_dask.align?")


def add_to_anndata(adata: Any, result: xr.Dataset, *, key_added: str = "ssa", spatial_key: str | None = "spatial") -> Any:
    """Write an SSA result into an AnnData of the same cells, scanpy style.

    Writes ``obs[f"{key_added}_spot"]`` (spot name), ``obs[f"{key_added}_probability"]``,
    ``obs[f"{key_added}_assigned"]``, ``obs[f"{key_added}_x"]``/``_y`` when known,
    ``obsm[f"{key_added}_top_spot"]`` and ``obsm[f"{key_added}_top_probability"]``, the run
    record in ``uns[key_added]``, and, when the spots have coordinates, the assigned spot's
    coordinates as ``obsm[spatial_key]`` (``(n_cells, 2)``), so that
    ``sc.pl.embedding(adata, basis="spatial")`` draws the cells where they were placed.  Cells left
    unassigned (``drop_empty``) get a missing spot category, NaN probability and coordinates, and
    top spots -1.

    Parameters
    ----------
    adata : anndata.AnnData
        Cells in the same order as ``result.cell``.
    result : xarray.Dataset
        Output of :func:`ssa_dask.align` or :func:`open_result`.
    key_added : str
        Prefix of the keys written.
    spatial_key : str or None
        ``obsm`` key for the assigned coordinates (replaced if present); None writes none.

    Returns
    -------
    anndata.AnnData
        ``adata``, modified in place.
    """
    cells = pd.Index(np.asarray(result["cell"].values, dtype=object))
    if len(cells) != adata.n_obs or not cells.equals(pd.Index(adata.obs_names.astype(str))):
        raise ValueError("the result's cells do not match adata.obs_names (same cells, same order expected)")
    assigned = result["assigned"].values.astype(bool) if "assigned" in result else np.ones(len(cells), dtype=bool)
    spot_names = pd.Series(np.asarray(result["spot_name"].values, dtype=object), dtype=object).where(assigned)
    adata.obs[f"{key_added}_spot"] = pd.Categorical(spot_names.to_numpy())
    adata.obs[f"{key_added}_probability"] = result["probability"].values
    adata.obs[f"{key_added}_assigned"] = assigned
    if "spot_x" in result:
        xy = np.column_stack([result["spot_x"].values, result["spot_y"].values]).astype(np.float64)
        xy[~assigned] = np.nan
        adata.obs[f"{key_added}_x"] = xy[:, 0]
        adata.obs[f"{key_added}_y"] = xy[:, 1]
        if spatial_key is not None:
            adata.obsm[spatial_key] = xy
    adata.obsm[f"{key_added}_top_spot"] = result["top_spot"].values
    adata.obsm[f"{key_added}_top_probability"] = result["top_probability"].values
    adata.uns[key_added] = {k: v for k, v in result.attrs.items() if k != "column_potential"}
    return adata


def _store_chunks(result: xr.Dataset) -> dict[str, int]:
    """Zarr chunks of a written result: cells and spots in blocks, every other dimension whole."""
    chunk = {"cell": CELL_CHUNK, SPOT_DIM: SPOT_CHUNK}
    return {dim: max(1, min(chunk.get(dim, size), size)) for dim, size in result.sizes.items()}


def write_result(result: xr.Dataset, path: str, *, overwrite: bool = False) -> None:
    """Write the result Dataset to a Zarr store atomically (aside, then moved into place).

    Cells are stored in chunks of :data:`CELL_CHUNK` (spots of :data:`SPOT_CHUNK`), metadata are
    consolidated, so ``xr.open_zarr(path)`` opens it quietly, lazily and in one metadata read.
    """
    from ssa_dask.paths import write_atomically

    chunks = _store_chunks(result)
    # Python-object strings (spot names) as NumPy strings, so that chunked they are written without a type probe.
    strings = {name: var.astype(np.dtypes.StringDType()) for name, var in result.data_vars.items() if var.dtype == object}
    chunked = result.assign(strings).chunk(chunks)
    for var in chunked.variables.values():
        var.encoding.pop("preferred_chunks", None)
        var.encoding.pop("shards", None)
        var.encoding["chunks"] = tuple(chunks[dim] for dim in var.dims)

    def write(tmp: Any) -> None:
        with warnings.catch_warnings(), dask.config.set(scheduler="sync"):
            # zarr 3 notes that consolidated metadata is outside its spec; xarray and zarr read it.
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
            # The values are in this process: write them from here, not from a cluster's workers.
            chunked.to_zarr(str(tmp), mode="w", consolidated=True)

    write_atomically(path, write, overwrite=overwrite)


def open_result(path: str) -> xr.Dataset:
    """Open a result written by :func:`write_result` (or ``ssa-dask align``) lazily.

    Parameters
    ----------
    path : str
        The result's Zarr store.

    Returns
    -------
    xarray.Dataset
        Dask-backed variables in the store's chunks; nothing is read until used.
    """
    return xr.open_zarr(str(path), consolidated=True)


#: The earlier name of :func:`open_result`.
read_result = open_result
