"""The paper's semi-simulation protocol: spots from a single-cell-resolution slide, scRNA replicates.

A single-cell-resolution spatial data set (cells with coordinates ``x``, ``y`` and a cell type)
gives a benchmark with a known answer:

1. :func:`bin_to_spots` cuts the slide into a square grid; every non-empty square becomes a
   "spot" whose expression is the mean of its cells and whose position is their centroid.
   The square of every cell is its *true spot*.
2. :func:`sample_replicates` draws ``R`` seeded sub-samples of the cells as "scRNA-seq" sets
   (coordinates hidden from the mapping method but kept in ``obs`` for scoring).
3. A mapping method places the replicate's cells on the spots and :mod:`ssa_dask.evaluation.metrics`
   compares predicted with true spots.

:func:`synthetic_tissue` makes a small realistic slide for demos and tests, and
:func:`write_simulation` writes spots, replicates and truth to disk (``ssa-dask simulate``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ssa_dask.errors import OutputExistsError, SSAInputError

__all__ = [
    "bin_to_spots",
    "cell_coordinates",
    "sample_replicates",
    "synthetic_tissue",
    "truth_table",
    "write_simulation",
]


def cell_coordinates(adata: ad.AnnData) -> np.ndarray:
    """Return the 2-D coordinates of the observations of ``adata``.

    Parameters
    ----------
    adata
        AnnData with ``obs["x"]`` and ``obs["y"]``, or else ``obsm["spatial"]`` (first two columns).

    Returns
    -------
    numpy.ndarray
        ``(n_obs, 2)`` float64 array of ``(x, y)``.
    """
    if "x" in adata.obs and "y" in adata.obs:
        xy = np.column_stack([adata.obs["x"].to_numpy(), adata.obs["y"].to_numpy()])
    elif "spatial" in adata.obsm:
        xy = np.asarray(adata.obsm["spatial"])[:, :2]
    else:
        raise SSAInputError('the AnnData has no coordinates: give obs["x"], obs["y"] or obsm["spatial"]')
    xy = np.asarray(xy, dtype=np.float64)
    if not np.isfinite(xy).all():
        raise SSAInputError("the cell coordinates contain NaN or infinite values")
    return xy


def _expression(adata: ad.AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise SSAInputError(f"layer {layer!r} is not in the AnnData (layers: {list(adata.layers)})")
    return adata.layers[layer]


def _grid_keys(xy: np.ndarray, origin: np.ndarray, spot_size: float) -> tuple[np.ndarray, np.ndarray]:
    ij = np.floor((xy - origin) / spot_size).astype(np.int64)
    return ij[:, 0], ij[:, 1]


def _n_nonempty(xy: np.ndarray, origin: np.ndarray, spot_size: float) -> int:
    gi, gj = _grid_keys(xy, origin, spot_size)
    return int(np.unique(gi * (gj.max() + 1) + gj).size)


def _spot_size_for(xy: np.ndarray, origin: np.ndarray, n_spots: int) -> float:
    """Bisect (in log space) the square side whose number of non-empty squares is closest to ``n_spots``."""
    extent = float(np.max(xy.max(axis=0) - origin))
    if extent <= 0:
        raise SSAInputError("all cells have the same coordinates; there is no slide to cut into spots")
    lo, hi = np.log(extent / (4.0 * np.sqrt(xy.shape[0]) + 4.0)), np.log(extent * 1.001)
    best_size, best_gap = float(np.exp(hi)), np.inf
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        size = float(np.exp(mid))
        count = _n_nonempty(xy, origin, size)
        gap = abs(count - n_spots)
        if gap < best_gap:
            best_size, best_gap = size, gap
        if count == n_spots:
            break
        if count > n_spots:
            lo = mid
        else:
            hi = mid
    return best_size


def _grouped_sum_dask(indicator: sp.csr_matrix, x) -> np.ndarray:
    """``indicator @ x`` for a Dask array ``x``, one row block at a time, summed as a tree."""
    import dask

    x = x.rechunk({1: -1})
    offsets = np.concatenate([[0], np.cumsum(x.chunks[0])])
    blocks = x.to_delayed().ravel()

    def partial(ind_block: sp.csr_matrix, block) -> np.ndarray:
        out = ind_block @ block
        return out.toarray() if sp.issparse(out) else np.asarray(out)

    parts = [
        dask.delayed(partial)(indicator[:, offsets[b] : offsets[b + 1]], blk) for b, blk in enumerate(blocks)
    ]
    while len(parts) > 1:
        parts = [
            dask.delayed(np.add)(parts[k], parts[k + 1]) if k + 1 < len(parts) else parts[k]
            for k in range(0, len(parts), 2)
        ]
    return np.asarray(dask.compute(parts[0])[0])


def bin_to_spots(
    adata: ad.AnnData,
    *,
    spot_size: float | None = None,
    n_spots: int | None = None,
    layer: str | None = None,
    log1p: bool = False,
    cell_type_key: str = "cell_type",
) -> tuple[ad.AnnData, np.ndarray]:
    """Cut a single-cell-resolution slide into square spots of mean expression.

    The grid starts at the lower-left corner ``(x0, y0) = (min x, min y)`` of the cells; cell
    ``c`` falls in square ``(i, j) = (floor((x_c - x0) / s), floor((y_c - y0) / s))`` with side ``s``
    (``i`` counts along ``x``, ``j`` along ``y``). Every non-empty square is a spot ``k`` with

    ``X_spot[k] = (1 / n_k) * sum_{c in k} X[c]``  and  ``(x_k, y_k) = mean_{c in k} (x_c, y_c)``,

    computed as one sparse product ``G @ X`` with the indicator matrix ``G[k, c] = 1 / n_k``, so a
    sparse ``X`` is never densified. A Dask array ``X`` (e.g. from ``anndata.experimental.read_lazy``)
    is reduced block by block (grouped sums as a tree reduction) and only the small spot matrix
    is materialised.

    Parameters
    ----------
    adata
        ``n_cells x n_genes`` AnnData with coordinates in ``obs["x"]``, ``obs["y"]`` (or
        ``obsm["spatial"]``).
    spot_size
        Side ``s`` of a grid square, in coordinate units.
    n_spots
        Instead of ``spot_size``: the side is chosen by bisection so that the number of non-empty
        squares is as close as possible to ``n_spots``.
    layer
        Use ``adata.layers[layer]`` instead of ``adata.X``.
    log1p
        Apply ``log(A + 1)`` to the spot means (after averaging), as the paper does to its matrices.
    cell_type_key
        ``obs`` column with cell types; when present the spots get ``obs["dominant_cell_type"]``
        (the most frequent type of their cells, used by the spot map).

    Returns
    -------
    spots : anndata.AnnData
        ``n_spots x n_genes``; obs ``x``, ``y`` (centroid), ``n_cells``, ``grid_i``, ``grid_j``
        (and ``dominant_cell_type``), ``obsm["spatial"]``; names ``"spot_<i>_<j>"``;
        ``uns["ssa_simulation"]`` holds ``spot_size`` and ``origin``. Sparse input gives CSR float32.
    cell_spot : numpy.ndarray
        ``(n_cells,)`` int64 row index into ``spots`` of each cell's true spot.
    """
    if (spot_size is None) == (n_spots is None):
        raise SSAInputError("give exactly one of spot_size or n_spots")
    if adata.n_obs == 0:
        raise SSAInputError("the AnnData has no cells")
    xy = cell_coordinates(adata)
    origin = xy.min(axis=0)
    if n_spots is not None:
        if int(n_spots) < 1:
            raise SSAInputError(f"n_spots must be a positive integer, got {n_spots}")
        spot_size = _spot_size_for(xy, origin, int(n_spots))
    spot_size = float(spot_size)
    if not np.isfinite(spot_size) or spot_size <= 0:
        raise SSAInputError(f"spot_size must be a positive number, got {spot_size}")

    gi, gj = _grid_keys(xy, origin, spot_size)
    keys = gi * (gj.max() + 1) + gj
    uniq, cell_spot = np.unique(keys, return_inverse=True)
    cell_spot = cell_spot.astype(np.int64).ravel()
    n_spot = uniq.size
    counts = np.bincount(cell_spot, minlength=n_spot).astype(np.float64)
    n = adata.n_obs
    indicator = sp.csr_matrix((1.0 / counts[cell_spot], (cell_spot, np.arange(n))), shape=(n_spot, n))

    x = _expression(adata, layer)
    if sp.issparse(x):
        spot_x = sp.csr_matrix(indicator @ sp.csr_matrix(x), dtype=np.float32)
    elif hasattr(x, "to_delayed"):
        spot_x = _grouped_sum_dask(indicator, x).astype(np.float32)
    else:
        spot_x = np.asarray(indicator @ np.asarray(x, dtype=np.float64), dtype=np.float32)
    if log1p:
        spot_x = _log1p(spot_x)

    centroid = indicator @ xy
    first = np.zeros(n_spot, dtype=np.int64)
    first[cell_spot[::-1]] = np.arange(n)[::-1]
    spot_i, spot_j = gi[first], gj[first]
    obs = pd.DataFrame(
        {
            "x": centroid[:, 0],
            "y": centroid[:, 1],
            "n_cells": counts.astype(np.int64),
            "grid_i": spot_i,
            "grid_j": spot_j,
        },
        index=pd.Index([f"spot_{i}_{j}" for i, j in zip(spot_i, spot_j)], dtype=str),
    )
    if cell_type_key in adata.obs:
        table = pd.crosstab(cell_spot, adata.obs[cell_type_key].to_numpy())
        obs["dominant_cell_type"] = pd.Categorical(table.idxmax(axis=1).to_numpy())
    spots = ad.AnnData(X=spot_x, obs=obs, var=adata.var.copy())
    spots.obsm["spatial"] = centroid
    spots.uns["ssa_simulation"] = {"spot_size": spot_size, "origin": origin.tolist(), "log1p": bool(log1p)}
    return spots, cell_spot


def _log1p(x):
    if sp.issparse(x):
        x = x.copy()
        x.data = np.log1p(x.data)
        return x
    return np.log1p(x)


def sample_replicates(
    adata: ad.AnnData,
    *,
    n_replicates: int = 10,
    fraction: float | None = None,
    n_cells: int | None = None,
    seed: int = 0,
    log1p: bool = True,
    true_spot: np.ndarray | None = None,
    layer: str | None = None,
    cell_type_key: str = "cell_type",
) -> list[ad.AnnData]:
    """Draw ``R`` seeded sub-samples of the cells as "scRNA-seq" replicates.

    Replicate ``r`` holds ``m`` cells drawn without replacement with
    ``numpy.random.default_rng([seed, r])`` (so each replicate is reproducible on its own), in
    their original order. ``log(A + 1)`` is applied to the expression when ``log1p`` is true, as
    in the paper; pass ``log1p=False`` for data that are already log-normalised (e.g. the seqFISH
    mouse embryo ``logcounts``) so that they are not logged twice.

    Parameters
    ----------
    adata
        ``n_cells x n_genes`` AnnData with coordinates (``obs["x"]``, ``obs["y"]`` or
        ``obsm["spatial"]``).
    n_replicates
        Number ``R`` of replicates.
    fraction
        Fraction of the cells in each replicate (``0 < fraction <= 1``).
    n_cells
        Instead of ``fraction``: number of cells per replicate. With neither, ``fraction=0.5``.
    seed
        Base seed.
    log1p
        Apply ``log(A + 1)`` to the sampled expression.
    true_spot
        ``(n_cells,)`` true spot index of every cell (``cell_spot`` from :func:`bin_to_spots`);
        defaults to ``adata.obs["true_spot"]`` when present.
    layer
        Use ``adata.layers[layer]`` instead of ``adata.X``.
    cell_type_key
        ``obs`` column with the cell types, copied as ``obs["cell_type"]``.

    Returns
    -------
    list of anndata.AnnData
        ``R`` AnnData objects (``m x n_genes``) with obs ``cell_type``, ``x``, ``y``,
        ``true_spot`` (when known) and ``replicate``.
    """
    if n_replicates < 1:
        raise SSAInputError(f"n_replicates must be at least 1, got {n_replicates}")
    if fraction is not None and n_cells is not None:
        raise SSAInputError("give at most one of fraction or n_cells")
    total = adata.n_obs
    if n_cells is None:
        fraction = 0.5 if fraction is None else float(fraction)
        if not 0 < fraction <= 1:
            raise SSAInputError(f"fraction must be in (0, 1], got {fraction}")
        n_cells = max(1, round(fraction * total))
    if not 1 <= int(n_cells) <= total:
        raise SSAInputError(f"n_cells must be between 1 and the {total} cells available, got {n_cells}")
    if true_spot is None and "true_spot" in adata.obs:
        true_spot = adata.obs["true_spot"].to_numpy()
    if true_spot is not None:
        true_spot = np.asarray(true_spot, dtype=np.int64)
        if true_spot.shape != (total,):
            raise SSAInputError(f"true_spot must have shape ({total},), got {true_spot.shape}")
    xy = cell_coordinates(adata)
    x_all = _expression(adata, layer)

    replicates = []
    for r in range(n_replicates):
        rng = np.random.default_rng([seed, r])
        idx = np.sort(rng.choice(total, size=int(n_cells), replace=False))
        x = x_all[idx]
        if hasattr(x, "compute"):
            x = x.compute()
        x = sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32)
        if log1p:
            x = _log1p(x)
        obs = pd.DataFrame({"x": xy[idx, 0], "y": xy[idx, 1]}, index=adata.obs_names[idx].astype(str))
        if cell_type_key in adata.obs:
            obs.insert(0, "cell_type", adata.obs[cell_type_key].to_numpy()[idx])
            obs["cell_type"] = obs["cell_type"].astype("category")
        if true_spot is not None:
            obs["true_spot"] = true_spot[idx]
        obs["replicate"] = r
        rep = ad.AnnData(X=x, obs=obs, var=adata.var.copy())
        rep.uns["ssa_simulation"] = {"replicate": r, "seed": int(seed), "log1p": bool(log1p)}
        replicates.append(rep)
    return replicates


def _smooth_fields(rng: np.random.Generator, xy: np.ndarray, n_fields: int, length: float) -> np.ndarray:
    """``n_fields`` smooth random fields at ``xy`` (random Fourier features, correlation length ``length``)."""
    n_features = 64
    omega = rng.normal(scale=1.0 / length, size=(n_fields, n_features, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(n_fields, n_features))
    field = np.cos(np.einsum("nd,fkd->fnk", xy, omega) + phase[:, None, :]).sum(axis=2)
    return (field * np.sqrt(2.0 / n_features)).T


def synthetic_tissue(
    n_cells: int = 5000,
    n_genes: int = 300,
    n_types: int = 6,
    *,
    seed: int = 0,
    size: float = 1000.0,
    markers_per_type: int = 15,
    n_gradient_genes: int = 20,
    dispersion: float = 5.0,
    mean_library_size: float = 500.0,
) -> ad.AnnData:
    """Simulate a single-cell-resolution tissue slide with raw counts.

    Model:

    * positions uniform on ``[0, size]^2``;
    * cell types form smooth spatial domains: type of cell ``c`` = ``argmax_t (f_t(x_c) + 0.35 e_ct)``
      with standardised smooth random fields ``f_t`` (correlation length ``size / 6``) and Gaussian noise ``e``,
      so domains are contiguous with mixed borders;
    * expression programme per type: baseline gene means ``mu_g ~ LogNormal(0, 1)``; each type
      gets ``markers_per_type`` marker genes multiplied by ``exp(U(1.5, 3))`` and small
      log-fold changes ``N(0, 0.3)`` on all genes; ``n_gradient_genes`` genes follow smooth
      spatial fields (``exp(0.8 g(x))``) so positions within a domain carry information;
    * library size ``L_c ~ mean_library_size * LogNormal(0, 0.35)``;
    * counts ``Y_cg ~ NegativeBinomial(mean = L_c p_cg, dispersion)`` as a Gamma-Poisson mixture,
      where ``p_cg`` is the cell's programme normalised to sum 1.

    Parameters
    ----------
    n_cells, n_genes, n_types
        Size of the slide and number of cell types.
    seed
        Seed of ``numpy.random.default_rng``.
    size
        Side of the square slide, in coordinate units (think micrometres).
    markers_per_type
        Marker genes per type (disjoint as far as ``n_genes`` allows).
    n_gradient_genes
        Genes with a smooth spatial trend.
    dispersion
        Negative-binomial dispersion ``theta`` (variance = mean + mean^2 / theta).
    mean_library_size
        Median total count per cell.

    Returns
    -------
    anndata.AnnData
        ``n_cells x n_genes`` raw counts, CSR float32; obs ``x``, ``y``, ``cell_type``
        (categorical ``"type_0"``...), ``obsm["spatial"]``; var names ``"gene_0"``...
    """
    if n_cells < 1 or n_genes < 2 or n_types < 1:
        raise SSAInputError("synthetic_tissue needs n_cells >= 1, n_genes >= 2 and n_types >= 1")
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, size, size=(n_cells, 2))
    fields = _smooth_fields(rng, xy, n_types, size / 6.0)
    fields = (fields - fields.mean(axis=0)) / (fields.std(axis=0) + 1e-12)
    domain = fields + 0.35 * rng.normal(size=(n_cells, n_types))
    cell_type = domain.argmax(axis=1)

    log_mu = rng.normal(0.0, 1.0, size=n_genes)
    log_prog = log_mu[None, :] + rng.normal(0.0, 0.3, size=(n_types, n_genes))
    marker_pool = rng.permutation(n_genes)
    for t in range(n_types):
        markers = np.take(marker_pool, np.arange(t * markers_per_type, (t + 1) * markers_per_type), mode="wrap")
        log_prog[t, markers] += rng.uniform(1.5, 3.0, size=markers.size)
    gradient_genes = rng.choice(n_genes, size=min(n_gradient_genes, n_genes), replace=False)
    log_rate = log_prog[cell_type]
    if gradient_genes.size:
        log_rate[:, gradient_genes] += 0.8 * _smooth_fields(rng, xy, gradient_genes.size, size / 3.0)
    prob = np.exp(log_rate - log_rate.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    library = mean_library_size * rng.lognormal(0.0, 0.35, size=n_cells)
    mean = library[:, None] * prob
    counts = rng.poisson(rng.gamma(dispersion, mean / dispersion))

    obs = pd.DataFrame(
        {
            "x": xy[:, 0],
            "y": xy[:, 1],
            "cell_type": pd.Categorical([f"type_{t}" for t in cell_type], categories=[f"type_{t}" for t in range(n_types)]),
        },
        index=pd.Index([f"cell_{c}" for c in range(n_cells)], dtype=str),
    )
    var = pd.DataFrame(index=pd.Index([f"gene_{g}" for g in range(n_genes)], dtype=str))
    tissue = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=obs, var=var)
    tissue.obsm["spatial"] = xy
    return tissue


def write_simulation(
    out_dir: str | Path,
    spots: ad.AnnData,
    replicates: Sequence[ad.AnnData],
    truth: pd.DataFrame,
    *,
    overwrite: bool = False,
    params: dict | None = None,
) -> Path:
    """Write a semi-simulation to ``out_dir``.

    Layout: ``spots.h5ad``; ``replicates/replicate_<r>.h5ad`` (zero-padded ``r``);
    ``truth.csv`` (one row per cell of the slide: its true spot and coordinates);
    ``simulation.json`` (spot size, counts and ``params``).

    Parameters
    ----------
    out_dir
        Output folder (created).
    spots
        Spots AnnData from :func:`bin_to_spots`.
    replicates
        Replicates from :func:`sample_replicates`.
    truth
        Table indexed by cell with at least ``true_spot`` (see :func:`truth_table`).
    overwrite
        Replace existing files; otherwise an existing ``spots.h5ad`` raises
        :class:`~ssa_dask.errors.OutputExistsError`.
    params
        Extra JSON-serialisable parameters recorded in ``simulation.json``.

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """
    out = Path(out_dir)
    if (out / "spots.h5ad").exists() and not overwrite:
        raise OutputExistsError(f"{out / 'spots.h5ad'} exists; pass overwrite=True (--overwrite) to replace it")
    if "true_spot" not in truth:
        raise SSAInputError('the truth table needs a "true_spot" column')
    (out / "replicates").mkdir(parents=True, exist_ok=True)
    spots.write_h5ad(out / "spots.h5ad", compression="gzip")
    width = max(3, len(str(len(replicates) - 1)))
    for r, rep in enumerate(replicates):
        rep.write_h5ad(out / "replicates" / f"replicate_{r:0{width}d}.h5ad", compression="gzip")
    truth.to_csv(out / "truth.csv", index_label="cell")
    meta = {
        "n_spots": int(spots.n_obs),
        "n_genes": int(spots.n_vars),
        "n_cells": len(truth),
        "n_replicates": len(replicates),
        "cells_per_replicate": [int(rep.n_obs) for rep in replicates],
        **{k: v for k, v in spots.uns.get("ssa_simulation", {}).items()},
        **(params or {}),
    }
    (out / "simulation.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out


def truth_table(adata: ad.AnnData, spots: ad.AnnData, cell_spot: np.ndarray, cell_type_key: str = "cell_type") -> pd.DataFrame:
    """Per-cell ground truth: true spot index and name, cell and spot coordinates, cell type.

    Parameters
    ----------
    adata
        The slide given to :func:`bin_to_spots`.
    spots, cell_spot
        Its outputs.
    cell_type_key
        ``obs`` column with cell types (copied when present).

    Returns
    -------
    pandas.DataFrame
        Indexed by cell name: ``true_spot``, ``true_spot_name``, ``x``, ``y``, ``spot_x``, ``spot_y``
        (and ``cell_type``).
    """
    xy = cell_coordinates(adata)
    spot_xy = cell_coordinates(spots)
    table = pd.DataFrame(
        {
            "true_spot": np.asarray(cell_spot, dtype=np.int64),
            "true_spot_name": spots.obs_names.to_numpy()[cell_spot],
            "x": xy[:, 0],
            "y": xy[:, 1],
            "spot_x": spot_xy[cell_spot, 0],
            "spot_y": spot_xy[cell_spot, 1],
        },
        index=adata.obs_names.astype(str),
    )
    if cell_type_key in adata.obs:
        table["cell_type"] = adata.obs[cell_type_key].to_numpy()
    return table
