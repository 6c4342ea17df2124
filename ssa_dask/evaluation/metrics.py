"""Accuracy metrics of a cell -> spot mapping against the known truth of a semi-simulation.

* :func:`mean_euclidean`, :func:`mean_manhattan`: mean distance between predicted and true
  positions (the paper's Tables 1-2).
* :func:`spot_accuracy`, :func:`topk_accuracy`: fraction of cells on (one of the top-k) exact spots.
* :func:`kde_kl_divergence`, :func:`per_type_kl`: KL divergence between 2-D Gaussian kernel density
  estimates of true and predicted locations (the paper's Figure 3).
* :func:`paired_wilcoxon`: paired two-sided Wilcoxon signed-rank tests between methods across
  replicates.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

from ssa_dask.errors import SSAInputError

__all__ = [
    "kde_kl_divergence",
    "mean_euclidean",
    "mean_manhattan",
    "paired_wilcoxon",
    "per_type_kl",
    "spot_accuracy",
    "topk_accuracy",
]

logger = logging.getLogger(__name__)

NanPolicy = Literal["raise", "omit"]


def _paired_xy(pred_xy, true_xy, nan_policy: NanPolicy) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred_xy, dtype=np.float64)
    true = np.asarray(true_xy, dtype=np.float64)
    if pred.ndim != 2 or pred.shape != true.shape:
        raise SSAInputError(f"pred_xy and true_xy must both be (n, d) arrays, got {pred.shape} and {true.shape}")
    bad = ~(np.isfinite(pred).all(axis=1) & np.isfinite(true).all(axis=1))
    if bad.any():
        if nan_policy == "raise":
            raise SSAInputError(f"{int(bad.sum())} rows hold NaN/inf coordinates (use nan_policy='omit' to skip them)")
        pred, true = pred[~bad], true[~bad]
    if pred.shape[0] == 0:
        raise SSAInputError("no cells to score")
    return pred, true


def mean_euclidean(pred_xy, true_xy, *, nan_policy: NanPolicy = "raise") -> float:
    """Mean Euclidean distance ``(1/n) sum_c ||p_c - t_c||_2``.

    Parameters
    ----------
    pred_xy, true_xy
        ``(n, d)`` predicted and true coordinates.
    nan_policy
        ``"raise"`` on non-finite rows (e.g. unmapped cells), or ``"omit"`` them.

    Returns
    -------
    float
    """
    pred, true = _paired_xy(pred_xy, true_xy, nan_policy)
    return float(np.sqrt(((pred - true) ** 2).sum(axis=1)).mean())


def mean_manhattan(pred_xy, true_xy, *, nan_policy: NanPolicy = "raise") -> float:
    """Mean Manhattan distance ``(1/n) sum_c sum_d |p_cd - t_cd|``.

    Parameters
    ----------
    pred_xy, true_xy
        ``(n, d)`` predicted and true coordinates.
    nan_policy
        ``"raise"`` on non-finite rows (e.g. unmapped cells), or ``"omit"`` them.

    Returns
    -------
    float
    """
    pred, true = _paired_xy(pred_xy, true_xy, nan_policy)
    return float(np.abs(pred - true).sum(axis=1).mean())


def spot_accuracy(pred_spot, true_spot) -> float:
    """Fraction of cells whose predicted spot equals the true spot.

    Parameters
    ----------
    pred_spot, true_spot
        ``(n,)`` integer spot indices; an unmapped cell (``-1``) counts as wrong.

    Returns
    -------
    float
    """
    pred = np.asarray(pred_spot)
    true = np.asarray(true_spot)
    if pred.shape != true.shape or pred.ndim != 1 or pred.size == 0:
        raise SSAInputError(f"pred_spot and true_spot must be equal-length non-empty vectors, got {pred.shape}, {true.shape}")
    return float(np.mean((pred == true) & (pred >= 0)))


def topk_accuracy(top_spots, true_spot) -> float:
    """Fraction of cells whose true spot is among their ``k`` predicted spots.

    Parameters
    ----------
    top_spots
        ``(n, k)`` integer spot indices, best first (``-1`` entries never match).
    true_spot
        ``(n,)`` true spot indices.

    Returns
    -------
    float
    """
    top = np.asarray(top_spots)
    true = np.asarray(true_spot)
    if top.ndim == 1:
        top = top[:, None]
    if top.ndim != 2 or top.shape[0] != true.shape[0] or true.ndim != 1 or true.size == 0:
        raise SSAInputError(f"top_spots must be (n, k) and true_spot (n,), got {top.shape}, {true.shape}")
    return float(np.mean(((top == true[:, None]) & (top >= 0)).any(axis=1)))


def kde_kl_divergence(
    true_xy,
    pred_xy,
    *,
    grid_size: int = 100,
    bw_method: str | float = "scott",
    floor: float = 1e-12,
    padding: float = 0.1,
) -> float:
    """KL divergence ``KL(P_true || P_pred)`` between 2-D Gaussian KDEs of two point sets.

    Each point set gets its own :class:`scipy.stats.gaussian_kde` (bandwidth rule ``bw_method``:
    with ``"scott"`` the kernel covariance is the sample covariance times ``n^(-2/(d+4))``,
    ``n^(-1/3)`` in 2-D). Both densities are evaluated on one common ``grid_size x grid_size``
    grid spanning the bounding box of *both* point sets, widened by ``padding`` times its extent
    on every side, and normalised to sum to 1 on the grid: ``P_i``, ``Q_i``. Then, with
    ``P_i, Q_i <- max(P_i, floor), max(Q_i, floor)`` renormalised (the floor keeps
    ``log 0`` out where a density underflows),

    ``KL = sum_i P_i log(P_i / Q_i)``  (natural log, nats).

    Parameters
    ----------
    true_xy, pred_xy
        ``(n, 2)`` and ``(m, 2)`` coordinates; each needs at least 3 points that do not lie on
        one line (otherwise the KDE covariance is singular).
    grid_size
        Grid points per axis.
    bw_method
        Passed to :class:`scipy.stats.gaussian_kde` (``"scott"``, ``"silverman"`` or a factor).
    floor
        Lower bound on grid probabilities before taking logs.
    padding
        Widening of the grid box, as a fraction of its extent.

    Returns
    -------
    float
        ``KL >= 0``; 0 for identical point sets.

    Raises
    ------
    SSAInputError
        Fewer than 3 points, or a degenerate (singular covariance) point set.
    """
    p_pts = np.asarray(true_xy, dtype=np.float64)
    q_pts = np.asarray(pred_xy, dtype=np.float64)
    for name, pts in (("true_xy", p_pts), ("pred_xy", q_pts)):
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise SSAInputError(f"{name} must be an (n, 2) array, got shape {pts.shape}")
        if pts.shape[0] < 3:
            raise SSAInputError(f"{name} has {pts.shape[0]} points; a 2-D KDE needs at least 3")
        if not np.isfinite(pts).all():
            raise SSAInputError(f"{name} holds NaN/inf coordinates")
    try:
        kde_p = stats.gaussian_kde(p_pts.T, bw_method=bw_method)
        kde_q = stats.gaussian_kde(q_pts.T, bw_method=bw_method)
    except np.linalg.LinAlgError as err:
        raise SSAInputError(f"degenerate point set (singular KDE covariance): {err}") from err
    both = np.vstack([p_pts, q_pts])
    lo, hi = both.min(axis=0), both.max(axis=0)
    pad = padding * np.maximum(hi - lo, 1e-12)
    gx = np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid_size)
    gy = np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid_size)
    grid = np.vstack([np.repeat(gx, grid_size), np.tile(gy, grid_size)])
    p = _normalise(kde_p(grid), floor)
    q = _normalise(kde_q(grid), floor)
    return float(max(np.sum(p * np.log(p / q)), 0.0))


def _normalise(density: np.ndarray, floor: float) -> np.ndarray:
    total = density.sum()
    if not np.isfinite(total) or total <= 0:
        raise SSAInputError("the KDE vanishes on the evaluation grid")
    prob = np.maximum(density / total, floor)
    return prob / prob.sum()


def per_type_kl(cell_types, true_xy, pred_xy, *, min_cells: int = 3, **kde_options) -> pd.Series:
    """KDE KL divergence between true and predicted locations, one value per cell type.

    Parameters
    ----------
    cell_types
        ``(n,)`` labels.
    true_xy, pred_xy
        ``(n, 2)`` true and predicted coordinates; rows with NaN predictions (unmapped cells)
        are left out.
    min_cells
        Types with fewer (mapped) cells are skipped.
    **kde_options
        Passed to :func:`kde_kl_divergence`.

    Returns
    -------
    pandas.Series
        KL per cell type (index: type, sorted). Skipped types (fewer than ``min_cells`` cells, or
        collinear / identical points so the KDE is singular) are absent; their reasons are in
        ``series.attrs["skipped"]`` (type -> reason) and logged at INFO level.
    """
    labels = np.asarray(cell_types).astype(str)
    true = np.asarray(true_xy, dtype=np.float64)
    pred = np.asarray(pred_xy, dtype=np.float64)
    if not (labels.shape[0] == true.shape[0] == pred.shape[0]):
        raise SSAInputError("cell_types, true_xy and pred_xy must have the same number of rows")
    mapped = np.isfinite(pred).all(axis=1) & np.isfinite(true).all(axis=1)
    values: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for label in map(str, np.unique(labels)):
        rows = (labels == label) & mapped
        if rows.sum() < min_cells:
            skipped[label] = f"{int(rows.sum())} mapped cells (< {min_cells})"
            continue
        try:
            values[label] = kde_kl_divergence(true[rows], pred[rows], **kde_options)
        except SSAInputError as err:
            skipped[label] = str(err)
    for label, reason in skipped.items():
        logger.info("per_type_kl: skipped cell type %r: %s", label, reason)
    series = pd.Series(values, dtype=np.float64, name="kl")
    series.index.name = "cell_type"
    series.attrs["skipped"] = skipped
    return series


def paired_wilcoxon(
    table: pd.DataFrame,
    *,
    value: str | None = None,
    method: str = "method",
    replicate: str = "replicate",
) -> pd.DataFrame:
    """Paired two-sided Wilcoxon signed-rank p-values between every pair of methods.

    Methods ``a`` and ``b`` are paired by replicate: the test is
    ``scipy.stats.wilcoxon(v_a - v_b, alternative="two-sided")`` over the replicates where both
    have a finite value. When every difference is zero the methods are indistinguishable and
    ``p = 1``; with no usable pair ``p = NaN``.

    Parameters
    ----------
    table
        Wide form (rows = replicates, columns = methods, values = a metric), or long form with
        columns ``method``, ``replicate`` and ``value`` when ``value`` is given.
    value, method, replicate
        Column names of the long form.

    Returns
    -------
    pandas.DataFrame
        Symmetric ``methods x methods`` p-values, NaN on the diagonal.
    """
    if value is not None:
        missing = {value, method, replicate} - set(table.columns)
        if missing:
            raise SSAInputError(f"the table lacks columns {sorted(missing)}")
        wide = table.pivot_table(index=replicate, columns=method, values=value, aggfunc="mean")
    else:
        wide = table
    wide = wide.astype(np.float64)
    names = list(wide.columns)
    out = pd.DataFrame(np.nan, index=pd.Index(names, name="method"), columns=pd.Index(names, name="versus"))
    for a_pos, a in enumerate(names):
        for b in names[a_pos + 1 :]:
            diff = (wide[a] - wide[b]).to_numpy()
            diff = diff[np.isfinite(diff)]
            if diff.size == 0:
                p = np.nan
            elif np.all(diff == 0):
                p = 1.0
            else:
                p = float(stats.wilcoxon(diff, alternative="two-sided").pvalue)
            out.loc[a, b] = out.loc[b, a] = p
    return out
