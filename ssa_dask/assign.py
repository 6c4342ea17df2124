"""From the solved plan to per-cell assignments: argmax, top-k, probabilities, as xarray.

The plan ``T = diag(a) K diag(b)`` is never formed: row ``i``'s largest entries are those of
``K_ij b_j`` and the row-normalised weights are ``K_ij b_j / sum_l K_il b_l``; one pass over the
kernel blocks gives them for every cell.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr


def assignment_dataset(
    top_spot: np.ndarray,
    top_probability: np.ndarray,
    cell_names: pd.Index,
    spot_names: pd.Index,
    spot_coords: np.ndarray | None,
    f: np.ndarray | None = None,
    attrs: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Assemble the per-cell result.

    Parameters
    ----------
    top_spot : (n_cells, k) int array
        Spot indices by decreasing plan weight.
    top_probability : (n_cells, k) array
        Row-normalised plan weight of those spots.
    cell_names, spot_names : pandas.Index
        Row names of the two matrices.
    spot_coords : (n_spots, 2) array or None
        Spot coordinates, copied for each cell's assigned spot.
    f : (n_cells,) array, optional
        Row potential of the solution (kept for warm starts and diagnostics).
    attrs : dict, optional
        Run record (lam, eps, iterations, error, genes...).

    Returns
    -------
    xarray.Dataset
        Variables ``spot``, ``spot_name``, ``probability`` over ``cell``; ``top_spot``,
        ``top_probability`` over ``(cell, rank)``; ``spot_x``, ``spot_y`` when coordinates are known.
    """
    best = top_spot[:, 0]
    data: dict[str, Any] = {
        "spot": ("cell", best.astype(np.int64)),
        "spot_name": ("cell", np.asarray(spot_names, dtype=object)[best]),
        "probability": ("cell", top_probability[:, 0]),
        "top_spot": (("cell", "rank"), top_spot.astype(np.int64)),
        "top_probability": (("cell", "rank"), top_probability),
    }
    if spot_coords is not None:
        data["spot_x"] = ("cell", spot_coords[best, 0])
        data["spot_y"] = ("cell", spot_coords[best, 1])
    if f is not None:
        data["potential"] = ("cell", f)
    ds = xr.Dataset(data, coords={"cell": np.asarray(cell_names, dtype=object), "rank": np.arange(top_spot.shape[1])})
    ds["probability"].attrs["description"] = "row-normalised transport plan at the assigned spot"
    ds["spot"].attrs["description"] = "index of the assigned spot (row of the spot matrix)"
    ds.attrs.update(attrs or {})
    return ds


def add_to_anndata(adata: Any, result: xr.Dataset, *, key_added: str = "ssa") -> Any:
    """Write an SSA result into an AnnData of the same cells, scanpy style.

    Writes ``obs[f"{key_added}_spot"]`` (spot name), ``obs[f"{key_added}_probability"]``,
    ``obs[f"{key_added}_assigned"]``, ``obs[f"{key_added}_x"]``/``_y`` when known,
    ``obsm[f"{key_added}_top_spot"]`` and ``obsm[f"{key_added}_top_probability"]``, and the run
    record in ``uns[key_added]``.  Cells left unassigned (``drop_empty``) get a missing spot
    category, NaN probability and coordinates, and top spots -1.

    Parameters
    ----------
    adata : anndata.AnnData
        Cells in the same order as ``result.cell``.
    result : xarray.Dataset
        Output of :func:`ssa_dask.align`.
    key_added : str
        Prefix of the keys written.

    Returns
    -------
    anndata.AnnData
        ``adata``, modified in place.
    """
    cells = pd.Index(result["cell"].values)
    if len(cells) != adata.n_obs or not cells.equals(pd.Index(adata.obs_names.astype(str))):
        raise ValueError("the result's cells do not match adata.obs_names (same cells, same order expected)")
    assigned = result["assigned"].values.astype(bool) if "assigned" in result else np.ones(len(cells), dtype=bool)
    spot_names = pd.Series(result["spot_name"].values, dtype=object).where(assigned)
    adata.obs[f"{key_added}_spot"] = pd.Categorical(spot_names.to_numpy())
    adata.obs[f"{key_added}_probability"] = result["probability"].values
    adata.obs[f"{key_added}_assigned"] = assigned
    if "spot_x" in result:
        adata.obs[f"{key_added}_x"] = result["spot_x"].values
        adata.obs[f"{key_added}_y"] = result["spot_y"].values
    adata.obsm[f"{key_added}_top_spot"] = result["top_spot"].values
    adata.obsm[f"{key_added}_top_probability"] = result["top_probability"].values
    adata.uns[key_added] = {k: v for k, v in result.attrs.items()}
    return adata


def write_result(result: xr.Dataset, path: str, *, overwrite: bool = False) -> None:
    """Write the result Dataset to a Zarr store atomically (aside, then moved into place).

    Metadata are consolidated, so ``xr.open_zarr(path)`` opens it quietly and in one read.
    """
    from ssa_dask.paths import write_atomically

    def write(tmp: Any) -> None:
        with warnings.catch_warnings():
            # zarr 3 notes that consolidated metadata is outside its spec; xarray and zarr read it.
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
            result.to_zarr(str(tmp), mode="w", consolidated=True)

    write_atomically(path, write, overwrite=overwrite)


def read_result(path: str) -> xr.Dataset:
    """Open a result written by :func:`write_result` (or ``ssa-dask align``) lazily."""
    return xr.open_zarr(str(path), consolidated=True)
