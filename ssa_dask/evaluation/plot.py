"""Figures of the semi-simulation benchmark (matplotlib, drawn off-screen with the Agg canvas).

Every function takes the data and an optional output ``path`` (PNG, written at ``dpi`` and
quantised to a 256-colour palette to stay small) and returns the :class:`matplotlib.figure.Figure`. Figures are built with
:class:`matplotlib.figure.Figure` directly, not ``pyplot``, so no global state or GUI backend is
touched.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = [
    "plot_kl_boxplot",
    "plot_lambda_sweep",
    "plot_ngenes_sweep",
    "plot_pred_vs_true",
    "plot_spot_map",
    "plot_sweep",
]



def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path | None, dpi: int) -> Figure:
    """Write ``fig``; a PNG is stored with a 256-colour adaptive palette to keep it small."""
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() != ".png":
        fig.savefig(path, dpi=dpi)
        return fig
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)
    return fig


def _colours(labels: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    if len(labels) <= 10:
        colours = list(colormaps["tab10"].colors)
    else:
        colours = [*colormaps["tab20"].colors, *colormaps["tab20b"].colors, *colormaps["tab20c"].colors]
    return {label: colours[k % len(colours)] for k, label in enumerate(labels)}


def plot_spot_map(
    spots_obs: pd.DataFrame,
    spot_size: float,
    origin: Sequence[float],
    path: str | Path | None = None,
    *,
    color: str = "dominant_cell_type",
    title: str | None = None,
    dpi: int = 110,
) -> Figure:
    """Map of the grid spots of a semi-simulation (the paper's Figure 2).

    Each non-empty grid square ``(i, j)`` is drawn at ``origin + (i, j) * spot_size`` with side
    ``spot_size``, filled by the spot's ``color`` column (its most frequent cell type by default),
    and its centroid marked with a dot.

    Parameters
    ----------
    spots_obs
        ``obs`` of the spots AnnData: ``grid_i``, ``grid_j``, ``x``, ``y`` (and ``color``).
    spot_size, origin
        Grid side and lower-left corner (``spots.uns["ssa_simulation"]``).
    path
        PNG to write, or None.
    color
        Categorical ``obs`` column to colour by; uniform grey when absent.
    title
        Figure title.
    dpi
        Resolution of the PNG.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _figure(7.0, 5.4)
    ax = fig.add_subplot()
    x0, y0 = float(origin[0]), float(origin[1])
    if color in spots_obs:
        labels = spots_obs[color].astype(str).to_numpy()
        palette = _colours(sorted(set(labels)))
        faces = [palette[label] for label in labels]
    else:
        labels, palette, faces = None, {}, ["0.8"] * len(spots_obs)
    squares = [
        Rectangle((x0 + i * spot_size, y0 + j * spot_size), spot_size, spot_size)
        for i, j in zip(spots_obs["grid_i"], spots_obs["grid_j"])
    ]
    ax.add_collection(PatchCollection(squares, facecolor=faces, edgecolor="white", linewidth=0.3))
    ax.scatter(spots_obs["x"], spots_obs["y"], s=1.5, c="k", linewidths=0)
    ax.set_aspect("equal")
    ax.autoscale_view()
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title or f"{len(spots_obs)} spots, side {spot_size:.4g}")
    if labels is not None:
        handles = [Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
        fig.legend(handles, list(palette), loc="outside right", fontsize=6, title=color, title_fontsize=7, frameon=False)
    return _save(fig, path, dpi)


def plot_pred_vs_true(
    true_xy: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    cell_types: Sequence[str],
    path: str | Path | None = None,
    *,
    jitter: float = 0.0,
    seed: int = 0,
    title: str | None = None,
    dpi: int = 80,
) -> Figure:
    """True cell locations next to each method's predicted locations for one replicate.

    Panel 1 shows the cells at their true positions; one panel per method shows them at the
    centroid of their predicted spot (unmapped cells, NaN, are left out), coloured by cell type.
    As many cells share a spot, predicted points get a uniform jitter of ``+-jitter / 2`` per axis
    (e.g. ``0.8 * spot_size``) so that piles stay visible.

    Parameters
    ----------
    true_xy
        ``(n, 2)`` true cell positions.
    predictions
        Method name -> ``(n, 2)`` predicted positions.
    cell_types
        ``(n,)`` labels.
    path
        PNG to write, or None.
    jitter
        Width of the jitter square, in coordinate units.
    seed
        Seed of the jitter.
    title
        Figure title.
    dpi
        Resolution of the PNG.

    Returns
    -------
    matplotlib.figure.Figure
    """
    panels = {"truth": np.asarray(true_xy, dtype=float), **{k: np.asarray(v, dtype=float) for k, v in predictions.items()}}
    n_cols = min(3, len(panels))
    n_rows = int(np.ceil(len(panels) / n_cols))
    fig = _figure(3.3 * n_cols + 1.4, 3.1 * n_rows)
    labels = np.asarray(cell_types).astype(str)
    palette = _colours(sorted(set(labels)))
    colours = np.array([palette[label] for label in labels])
    rng = np.random.default_rng(seed)
    lo = np.nanmin(panels["truth"], axis=0)
    hi = np.nanmax(panels["truth"], axis=0)
    for k, (name, xy) in enumerate(panels.items()):
        ax = fig.add_subplot(n_rows, n_cols, k + 1)
        shown = np.isfinite(xy).all(axis=1)
        pts = xy[shown]
        if name != "truth" and jitter > 0:
            pts = pts + rng.uniform(-jitter / 2, jitter / 2, size=pts.shape)
        ax.scatter(pts[:, 0], pts[:, 1], s=2.0, c=colours[shown], linewidths=0, rasterized=True)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.set_title(name if shown.all() else f"{name} ({int((~shown).sum())} unmapped)", fontsize=9)
        ax.tick_params(labelsize=6)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    fig.legend(handles, list(palette), loc="outside right", fontsize=6, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)


def plot_kl_boxplot(
    kl: pd.DataFrame,
    path: str | Path | None = None,
    *,
    method_order: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 110,
) -> Figure:
    """Box plot of per-cell-type KL divergences, one box per method (the paper's Figure 3).

    Parameters
    ----------
    kl
        Long table with columns ``method``, ``cell_type`` and ``kl`` (one value per type, e.g.
        averaged over replicates); each type is a point of its method's box.
    path
        PNG to write, or None.
    method_order
        Order of the boxes (default: by median KL).
    title
        Axes title.
    dpi
        Resolution of the PNG.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if method_order is None:
        method_order = list(kl.groupby("method")["kl"].median().sort_values().index)
    data = [kl.loc[kl["method"] == m, "kl"].dropna().to_numpy() for m in method_order]
    fig = _figure(max(4.5, 1.2 + 0.8 * len(method_order)), 4.0)
    ax = fig.add_subplot()
    ax.boxplot(data, tick_labels=list(method_order), showfliers=False)
    rng = np.random.default_rng(0)
    for k, values in enumerate(data, start=1):
        ax.scatter(k + rng.uniform(-0.15, 0.15, values.size), values, s=6, alpha=0.6, c="C0", linewidths=0)
    ax.set_ylabel("KL(true || predicted), per cell type")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.set_title(title or "Per-cell-type KL divergence of predicted locations", fontsize=9)
    return _save(fig, path, dpi)


def plot_sweep(
    table: pd.DataFrame,
    x: str,
    y: str,
    path: str | Path | None = None,
    *,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logx: bool = False,
    title: str | None = None,
    dpi: int = 110,
) -> Figure:
    """Mean +- standard deviation of ``y`` over replicates against a swept parameter ``x``.

    Parameters
    ----------
    table
        Long table with columns ``x`` and ``y`` (one row per replicate and value of ``x``).
    x, y
        Column names.
    path
        PNG to write, or None.
    xlabel, ylabel, title
        Labels.
    logx
        Logarithmic x axis.
    dpi
        Resolution of the PNG.

    Returns
    -------
    matplotlib.figure.Figure
    """
    stats = table.groupby(x)[y].agg(["mean", "std", "count"]).sort_index()
    fig = _figure(4.8, 3.6)
    ax = fig.add_subplot()
    ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path, dpi)


def plot_lambda_sweep(table: pd.DataFrame, path: str | Path | None = None, *, y: str = "euclidean_grid", **kwargs) -> Figure:
    """SSA accuracy against the entropic weight ``lam`` (``eps = lam * max(D)``); see :func:`plot_sweep`.

    Parameters
    ----------
    table
        Long table with columns ``lam`` and ``y``.
    path
        PNG to write, or None.
    y
        Metric column.
    **kwargs
        Passed to :func:`plot_sweep`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    kwargs.setdefault("title", "SSA: entropic regularisation sweep")
    kwargs.setdefault("ylabel", y)
    return plot_sweep(table, "lam", y, path, xlabel="lambda (eps = lambda * max D)", logx=True, **kwargs)


def plot_ngenes_sweep(table: pd.DataFrame, path: str | Path | None = None, *, y: str = "euclidean_grid", **kwargs) -> Figure:
    """SSA accuracy against the number of top-variance genes used; see :func:`plot_sweep`.

    Parameters
    ----------
    table
        Long table with columns ``n_genes_used`` and ``y``.
    path
        PNG to write, or None.
    y
        Metric column.
    **kwargs
        Passed to :func:`plot_sweep`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    kwargs.setdefault("title", "SSA: number of genes sweep")
    kwargs.setdefault("ylabel", y)
    return plot_sweep(table, "n_genes_used", y, path, xlabel="genes used", logx=True, **kwargs)
