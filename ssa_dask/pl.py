"""scanpy-style plots of what :func:`ssa_dask.tl.align` (or :func:`ssa_dask.write_plan_summary`) wrote.

Matplotlib only (no scanpy needed).  Every function draws on ``ax`` (or new axes from
``matplotlib.pyplot``), returns the Axes, and calls ``plt.show()`` only with ``show=True``; in a
notebook the figure appears at the end of the cell anyway.  Keys are read under ``key_added``
(see :mod:`ssa_dask.summary` for the list).

- :func:`assignments`: cells at their assigned spots, coloured by a label or a value;
- :func:`composition`: each spot's composition as a pie (or a stacked bar) on the spot grid;
- :func:`imputed_vs_measured`: an imputed gene beside the measured one, with their correlation;
- :func:`uncertainty`: entropy, top probability or expected distance on the cells' assigned spots;
- :func:`heldout_correlation`: per-gene correlations of :func:`ssa_dask.heldout_gene_check`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.collections import PatchCollection
from matplotlib.patches import Patch, Rectangle, Wedge
from scipy.spatial import cKDTree

from ssa_dask.errors import SSAInputError

__all__ = ["assignments", "composition", "heldout_correlation", "imputed_vs_measured", "uncertainty"]

#: Fractions below this are not drawn as pie wedges or bar segments.
SMALLEST_DRAWN_FRACTION = 1e-3


def assignments(
    adata_sc: Any,
    color: str | None = None,
    *,
    key_added: str = "ssa",
    jitter: float | None = None,
    size: float | None = None,
    legend: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes:
    """Cells drawn at their assigned spots, coloured by an ``obs`` column.

    Parameters
    ----------
    adata_sc : anndata.AnnData
        Cells with ``obsm[f"{key_added}_spatial"]``.
    color : str, optional
        ``obs`` column: categorical (a colour per category, with a legend) or numeric (a colour bar).
    key_added : str
        Prefix the keys were written under.
    jitter : float, optional
        Standard deviation of a seeded random shift of each cell, in coordinate units, so that cells
        on the same spot do not hide each other (default: a quarter of the spot spacing; 0: none).
    size : float, optional
        Marker size (points squared).
    legend : bool
        Draw the legend of a categorical ``color``.
    title : str, optional
        Axes title (default: ``color``).
    ax : matplotlib.axes.Axes, optional
        Where to draw.
    show : bool, optional
        Call ``plt.show()``.

    Returns
    -------
    matplotlib.axes.Axes
    """
    xy = _obsm(adata_sc, f"{key_added}_spatial", "adata_sc")
    placed = np.isfinite(xy).all(axis=1)
    xy = xy[placed]
    spacing = _spacing(np.unique(xy, axis=0))
    shift = 0.25 * spacing if jitter is None else float(jitter)
    if shift > 0:
        xy = xy + np.random.default_rng(0).normal(scale=shift, size=xy.shape)
    ax = _axes(ax)
    size = size if size is not None else _marker_size(xy.shape[0])
    if color is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c="0.3", linewidths=0)
    else:
        values = _obs(adata_sc, color, "adata_sc")[placed]
        _scatter_values(ax, xy, values, size, legend)
    return _finish(ax, title if title is not None else (color or "assigned spots"), show)


def composition(
    adata_sp: Any,
    *,
    key_added: str = "ssa",
    kind: str = "pie",
    categories: Sequence[str] | None = None,
    radius: float | None = None,
    legend: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes:
    """Each spot's composition, as a pie (or a stacked bar) at the spot's coordinates.

    Parameters
    ----------
    adata_sp : anndata.AnnData
        Spots with ``obsm[f"{key_added}_composition"]``, ``uns[f"{key_added}_categories"]`` and
        coordinates (``obsm["spatial"]`` or ``obs["x"]``/``obs["y"]``).
    key_added : str
        Prefix the keys were written under.
    kind : {"pie", "bar"}
        Pies, or stacked bars (bottom to top in category order).
    categories : sequence of str, optional
        Categories drawn (default: all); the others are left blank.
    radius : float, optional
        Pie radius (half the bar height), in coordinate units (default: 0.45 x the spot spacing).
    legend, title, ax, show
        As for :func:`assignments`.

    Returns
    -------
    matplotlib.axes.Axes
    """
    if kind not in ("pie", "bar"):
        raise SSAInputError(f"kind must be 'pie' or 'bar', got {kind!r}")
    fractions = _obsm(adata_sp, f"{key_added}_composition", "adata_sp")
    names = [str(c) for c in _uns(adata_sp, f"{key_added}_categories", "adata_sp")]
    shown = names if categories is None else [str(c) for c in categories]
    unknown = sorted(set(shown).difference(names))
    if unknown:
        raise SSAInputError(f"categories not in the composition: {unknown[:5]}")
    xy = _spot_coords(adata_sp)
    r = 0.45 * _spacing(xy) if radius is None else float(radius)
    colours = _palette(names)
    patches, faces = [], []
    for j in np.flatnonzero(np.isfinite(fractions).all(axis=1)):
        start = 0.0
        for c, name in enumerate(names):
            share = float(fractions[j, c])
            if name in shown and share >= SMALLEST_DRAWN_FRACTION:
                if kind == "pie":
                    patches.append(Wedge(xy[j], r, 90 + 360 * start, 90 + 360 * (start + share)))
                else:
                    patches.append(Rectangle((xy[j, 0] - r / 2, xy[j, 1] - r + 2 * r * start), r, 2 * r * share))
                faces.append(colours[name])
            start += share
    ax = _axes(ax)
    ax.add_collection(PatchCollection(patches, facecolors=faces, edgecolors="none"))
    ax.set_xlim(xy[:, 0].min() - 2 * r, xy[:, 0].max() + 2 * r)
    ax.set_ylim(xy[:, 1].min() - 2 * r, xy[:, 1].max() + 2 * r)
    if legend:
        _legend(ax, [Patch(color=colours[name], label=name) for name in shown])
    return _finish(ax, title if title is not None else "composition", show)


def imputed_vs_measured(
    adata_sp: Any,
    gene: str,
    *,
    key_added: str = "ssa",
    imputed: Any = None,
    measured: Any = None,
    layer: str | None = None,
    size: float | None = None,
    cmap: str = "viridis",
    axes: Sequence[Axes] | None = None,
    show: bool | None = None,
) -> np.ndarray:
    """An imputed gene beside the measured one on the spot coordinates, with their Pearson correlation.

    Parameters
    ----------
    adata_sp : anndata.AnnData
        Spots with coordinates.
    gene : str
        The gene.
    key_added : str
        Prefix the keys were written under.
    imputed : array-like or xarray.DataArray, optional
        Imputed values over the spots (a DataArray with a ``spot`` coordinate is matched by spot
        name, e.g. ``check["imputed"].sel(gene=gene)`` of :func:`ssa_dask.heldout_gene_check`);
        default: ``obsm[f"{key_added}_imputed"]``.
    measured : array-like or xarray.DataArray, optional
        Measured values over the spots (matched as ``imputed``); default: the gene's column of
        ``adata_sp.X`` (or of ``layer``).
    layer : str, optional
        Layer of ``adata_sp`` holding the measured values.
    size : float, optional
        Marker size.
    cmap : str
        Colour map.
    axes : two matplotlib Axes, optional
        Where to draw (measured, imputed).
    show : bool, optional
        Call ``plt.show()``.

    Returns
    -------
    numpy.ndarray
        The two Axes (measured, imputed); the imputed one's title gives the correlation.
    """
    spot_names = pd.Index(adata_sp.obs_names.astype(str))
    if imputed is None:
        genes = pd.Index([str(g) for g in _uns(adata_sp, f"{key_added}_imputed_genes", "adata_sp")])
        if gene not in genes:
            raise SSAInputError(f"{gene!r} was not imputed (imputed genes: {list(genes[:10])})")
        imputed_values = _obsm(adata_sp, f"{key_added}_imputed", "adata_sp")[:, genes.get_loc(gene)]
    else:
        imputed_values = _over_spots(imputed, spot_names, "imputed")
    if measured is None:
        measured_values = _measured(adata_sp, gene, layer)
    else:
        measured_values = _over_spots(measured, spot_names, "measured")
    xy = _spot_coords(adata_sp)
    r = _pearson(imputed_values, measured_values)
    if axes is None:
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(1, 2, figsize=(9, 4), layout="constrained")
    size = size if size is not None else _marker_size(xy.shape[0])
    for ax, values, what in zip(axes, (measured_values, imputed_values), ("measured", f"imputed (r = {r:.2f})")):
        drawn = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=size, cmap=cmap, linewidths=0, plotnonfinite=False)
        ax.figure.colorbar(drawn, ax=ax, shrink=0.8)
        _finish(ax, f"{gene}: {what}", False)
    _show(show)
    return np.asarray(axes)


def uncertainty(
    adata_sc: Any,
    value: str = "entropy",
    *,
    key_added: str = "ssa",
    size: float | None = None,
    cmap: str = "magma",
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes:
    """A per-cell uncertainty averaged over the cells of each assigned spot, on the spot coordinates.

    Parameters
    ----------
    adata_sc : anndata.AnnData
        Cells with ``obs[f"{key_added}_spot"]``, ``obsm[f"{key_added}_spatial"]`` and the value.
    value : {"entropy", "top_probability", "expected_distance"}
        Which uncertainty (``obs[f"{key_added}_{value}"]``).
    key_added : str
        Prefix the keys were written under.
    size, cmap, title, ax, show
        Marker size, colour map, title, where to draw, call ``plt.show()``.

    Returns
    -------
    matplotlib.axes.Axes
    """
    if value not in ("entropy", "top_probability", "expected_distance"):
        raise SSAInputError(f"value must be 'entropy', 'top_probability' or 'expected_distance', got {value!r}")
    values = np.asarray(_obs(adata_sc, f"{key_added}_{value}", "adata_sc"), dtype=np.float64)
    spot = _obs(adata_sc, f"{key_added}_spot", "adata_sc")
    xy = _obsm(adata_sc, f"{key_added}_spatial", "adata_sc")
    frame = pd.DataFrame({"spot": np.asarray(spot, dtype=object), "value": values, "x": xy[:, 0], "y": xy[:, 1]})
    per_spot = frame.dropna(subset=["spot"]).groupby("spot", sort=False).agg(value=("value", "mean"), x=("x", "first"),
                                                                           y=("y", "first"))
    ax = _axes(ax)
    size = size if size is not None else _marker_size(len(per_spot))
    drawn = ax.scatter(per_spot["x"], per_spot["y"], c=per_spot["value"], s=size, cmap=cmap, linewidths=0)
    ax.figure.colorbar(drawn, ax=ax, shrink=0.8, label=f"mean {value.replace('_', ' ')} of the spot's cells")
    return _finish(ax, title if title is not None else value.replace("_", " "), show)


def heldout_correlation(check: xr.Dataset, *, ax: Axes | None = None, show: bool | None = None) -> Axes:
    """Per-gene correlations of :func:`ssa_dask.heldout_gene_check`, sorted, with their median.

    Parameters
    ----------
    check : xarray.Dataset
        Output of :func:`ssa_dask.heldout_gene_check`.
    ax, show
        Where to draw; call ``plt.show()``.

    Returns
    -------
    matplotlib.axes.Axes
    """
    correlation = check["correlation"].to_series().sort_values()
    ax = _axes(ax, figsize=(max(4.0, 0.25 * correlation.size + 1.5), 3.5))
    ax.bar(np.arange(correlation.size), correlation.to_numpy(), color="tab:blue")
    median = float(np.nanmedian(correlation.to_numpy()))
    ax.axhline(median, color="tab:red", linestyle="--", label=f"median {median:.2f}")
    ax.set_xticks(np.arange(correlation.size), [str(g) for g in correlation.index], rotation=90, fontsize=7)
    ax.set_ylabel("Pearson r, imputed vs measured")
    ax.legend(frameon=False, loc="upper left")
    ax.set_title("held-out genes")
    _show(show)
    return ax


def _pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two vectors over the entries finite in both (NaN when either is constant)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


# ---------------------------------------------------------------------- helpers


def _axes(ax: Axes | None, figsize: tuple[float, float] = (6.0, 5.0)) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _finish(ax: Axes, title: str, show: bool | None) -> Axes:
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    _show(show)
    return ax


def _show(show: bool | None) -> None:
    if show:
        import matplotlib.pyplot as plt

        plt.show()


def _obs(adata: Any, key: str, what: str) -> np.ndarray:
    if key not in adata.obs:
        raise SSAInputError(f"{what}: no obs[{key!r}]; run ssa_dask.tl.align (or write_plan_summary) first, or pass "
                            "the key_added it used")
    return adata.obs[key].to_numpy()


def _obsm(adata: Any, key: str, what: str) -> np.ndarray:
    if key not in adata.obsm:
        raise SSAInputError(f"{what}: no obsm[{key!r}]; run ssa_dask.tl.align (or write_plan_summary) with what it "
                            "needs first, or pass the key_added it used")
    return np.asarray(adata.obsm[key], dtype=np.float64)


def _uns(adata: Any, key: str, what: str) -> Any:
    if key not in adata.uns:
        raise SSAInputError(f"{what}: no uns[{key!r}]; run ssa_dask.tl.align (or write_plan_summary) with what it "
                            "needs first, or pass the key_added it used")
    return adata.uns[key]


def _spot_coords(adata_sp: Any) -> np.ndarray:
    if "spatial" in adata_sp.obsm:
        return np.asarray(adata_sp.obsm["spatial"], dtype=np.float64)[:, :2]
    if {"x", "y"} <= set(adata_sp.obs.columns):
        return adata_sp.obs[["x", "y"]].to_numpy(dtype=np.float64)
    raise SSAInputError('adata_sp has no coordinates: give obsm["spatial"] or obs["x"], obs["y"]')


def _measured(adata_sp: Any, gene: str, layer: str | None) -> np.ndarray:
    names = pd.Index(adata_sp.var_names.astype(str))
    if gene not in names:
        raise SSAInputError(f"adata_sp: {gene!r} is not measured (not in var_names); pass measured=")
    matrix = adata_sp.X if layer is None else adata_sp.layers[layer]
    column = matrix[:, names.get_loc(gene)]
    return np.asarray(column.toarray() if sp.issparse(column) else column, dtype=np.float64).ravel()


def _over_spots(values: Any, spot_names: pd.Index, what: str) -> np.ndarray:
    if isinstance(values, xr.DataArray) and "spot" in values.coords:
        series = values.to_series()
        series.index = series.index.astype(str)
        missing = spot_names.difference(series.index)
        if missing.size:
            raise SSAInputError(f"{what}: no value for {missing.size} spots of adata_sp (e.g. {list(missing[:5])})")
        return series.reindex(spot_names).to_numpy(dtype=np.float64)
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size != spot_names.size:
        raise SSAInputError(f"{what}: {array.size} values for {spot_names.size} spots")
    return array


def _scatter_values(ax: Axes, xy: np.ndarray, values: np.ndarray, size: float, legend: bool) -> None:
    series = pd.Series(values)
    if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype == object or series.dtype == bool:
        categories = series.astype("category").cat.categories
        colours = _palette([str(c) for c in categories])
        faces = [colours[str(v)] if pd.notna(v) else (0.8, 0.8, 0.8, 1.0) for v in series]
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=faces, linewidths=0)
        if legend:
            _legend(ax, [Patch(color=colours[str(c)], label=str(c)) for c in categories])
    else:
        drawn = ax.scatter(xy[:, 0], xy[:, 1], s=size, c=series.to_numpy(dtype=np.float64), linewidths=0)
        ax.figure.colorbar(drawn, ax=ax, shrink=0.8)


def _legend(ax: Axes, handles: list[Patch]) -> None:
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=7,
              ncol=1 if len(handles) <= 30 else 2)


def _palette(names: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    if len(names) <= 10:
        colours = list(colormaps["tab10"].colors)
    else:
        colours = [*colormaps["tab20"].colors, *colormaps["tab20b"].colors, *colormaps["tab20c"].colors]
    return {name: colours[k % len(colours)] for k, name in enumerate(names)}


def _spacing(xy: np.ndarray) -> float:
    """Median distance from each point to its nearest neighbour (1.0 for fewer than two points)."""
    if xy.shape[0] < 2:
        return 1.0
    distance, _ = cKDTree(xy).query(xy, k=2)
    spacing = float(np.median(distance[:, 1]))
    return spacing if spacing > 0 else 1.0


def _marker_size(n_points: int) -> float:
    return float(np.clip(20000.0 / max(n_points, 1), 2.0, 80.0))
