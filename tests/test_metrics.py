"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ssa_dask.errors import SSAInputError
from ssa_dask.evaluation.metrics import (
    kde_kl_divergence,
    mean_euclidean,
    mean_manhattan,
    paired_wilcoxon,
    per_type_kl,
    spot_accuracy,
    topk_accuracy,
)

PRED = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
TRUE = np.array([[3.0, 4.0], [1.0, 1.0], [2.0, 2.0]])


def test_mean_euclidean_three_points():
    # distances 5 (3-4-5 triangle), 0, 2
    assert mean_euclidean(PRED, TRUE) == pytest.approx(7.0 / 3.0)


def test_mean_manhattan_three_points():
    # distances 3 + 4, 0, 2
    assert mean_manhattan(PRED, TRUE) == pytest.approx(3.0)


def test_distances_nan_policy():
    pred = np.vstack([PRED, [np.nan, np.nan]])
    true = np.vstack([TRUE, [0.0, 0.0]])
    with pytest.raises(SSAInputError, match="NaN"):
        mean_euclidean(pred, true)
    assert mean_euclidean(pred, true, nan_policy="omit") == pytest.approx(7.0 / 3.0)
    assert mean_manhattan(pred, true, nan_policy="omit") == pytest.approx(3.0)


def test_distances_shape_mismatch():
    with pytest.raises(SSAInputError):
        mean_euclidean(PRED, TRUE[:2])


def test_spot_accuracy():
    assert spot_accuracy([0, 1, 2, -1], [0, 2, 2, 3]) == pytest.approx(0.5)
    assert spot_accuracy([4, 4], [4, 4]) == 1.0


def test_topk_accuracy():
    top = np.array([[0, 1], [2, 3], [4, 5]])
    assert topk_accuracy(top, np.array([1, 0, 5])) == pytest.approx(2.0 / 3.0)
    # k = 1 reduces to spot accuracy
    assert topk_accuracy(top[:, :1], np.array([0, 2, 5])) == pytest.approx(spot_accuracy([0, 2, 4], [0, 2, 5]))
    assert topk_accuracy(np.array([[-1, -1]]), np.array([-1])) == 0.0


def test_kl_identity_is_zero():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(200, 2))
    assert kde_kl_divergence(pts, pts) == pytest.approx(0.0, abs=1e-12)


def test_kl_shift_is_positive_and_grows():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(300, 2))
    small = kde_kl_divergence(pts, pts + [0.5, 0.0])
    large = kde_kl_divergence(pts, pts + [2.0, 0.0])
    assert 0 < small < large


def test_kl_matches_gaussian_closed_form():
    # KDE of an N(m, I) sample is close to N(m, (1 + h^2) I), h^2 = n^(-1/3) (Scott, 2-D), so
    # KL(N(0, s I) || N(mu, s I)) = |mu|^2 / (2 s) with s = 1 + h^2.
    rng = np.random.default_rng(2)
    n = 4000
    base = rng.normal(size=(n, 2))
    other = rng.normal(size=(n, 2)) + [1.0, 0.0]
    expected = 1.0 / (2 * (1 + n ** (-1.0 / 3.0)))
    assert kde_kl_divergence(base, other, grid_size=120) == pytest.approx(expected, rel=0.1)


def test_kl_equals_explicit_formula():
    # the documented recipe written out with explicit Gaussian kernels (Scott factor n^(-1/3))
    p_pts = np.array([[0.0, 0.0], [1.0, 0.2], [0.3, 1.0], [1.2, 1.1]])
    q_pts = np.array([[0.5, 0.5], [1.5, 0.4], [0.7, 1.6], [2.0, 1.0], [1.0, 1.0]])
    g = 30

    def density(pts, grid):
        cov = np.cov(pts.T) * pts.shape[0] ** (-1.0 / 3.0)
        inv = np.linalg.inv(cov)
        d = grid[:, None, :] - pts[None, :, :]
        quad = np.einsum("gnd,de,gne->gn", d, inv, d)
        return np.exp(-0.5 * quad).sum(axis=1) / (pts.shape[0] * 2 * np.pi * np.sqrt(np.linalg.det(cov)))

    both = np.vstack([p_pts, q_pts])
    lo, hi = both.min(axis=0), both.max(axis=0)
    pad = 0.1 * (hi - lo)
    gx = np.linspace(lo[0] - pad[0], hi[0] + pad[0], g)
    gy = np.linspace(lo[1] - pad[1], hi[1] + pad[1], g)
    grid = np.array([[a, b] for a in gx for b in gy])
    p = density(p_pts, grid)
    q = density(q_pts, grid)
    p, q = np.maximum(p / p.sum(), 1e-12), np.maximum(q / q.sum(), 1e-12)
    p, q = p / p.sum(), q / q.sum()
    expected = np.sum(p * np.log(p / q))
    assert kde_kl_divergence(p_pts, q_pts, grid_size=g) == pytest.approx(expected, rel=1e-9)


def test_kl_degenerate_inputs():
    with pytest.raises(SSAInputError, match="at least 3"):
        kde_kl_divergence(np.zeros((2, 2)), np.ones((5, 2)))
    collinear = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    with pytest.raises(SSAInputError, match="degenerate"):
        kde_kl_divergence(collinear, np.random.default_rng(0).normal(size=(5, 2)))


def test_per_type_kl_skips_small_and_degenerate():
    rng = np.random.default_rng(3)
    true = rng.normal(size=(60, 2))
    pred = true.copy()
    pred[20:40] += [3.0, 0.0]
    types = np.array(["a"] * 20 + ["b"] * 20 + ["c"] * 18 + ["d"] * 2)
    pred[40:58] = [1.0, 1.0]  # type c predicted on a single point: singular covariance
    kl = per_type_kl(types, true, pred)
    assert list(kl.index) == ["a", "b"]
    assert kl["a"] == pytest.approx(0.0, abs=1e-12)
    assert kl["b"] > 0.5
    assert set(kl.attrs["skipped"]) == {"c", "d"}
    assert "< 3" in kl.attrs["skipped"]["d"]


def test_per_type_kl_ignores_unmapped_rows():
    rng = np.random.default_rng(4)
    true = rng.normal(size=(30, 2))
    pred = true.copy()
    pred[:5] = np.nan
    kl = per_type_kl(np.array(["a"] * 30), true, pred)
    assert kl["a"] == pytest.approx(0.0, abs=1e-12)


def test_paired_wilcoxon_hand_computed():
    # differences a - b = 1..5, all positive: exact two-sided p = 2 / 2^5
    wide = pd.DataFrame({"a": [2.0, 4.0, 6.0, 8.0, 10.0], "b": [1.0, 2.0, 3.0, 4.0, 5.0], "c": [2.0, 4.0, 6.0, 8.0, 10.0]})
    p = paired_wilcoxon(wide)
    assert p.loc["a", "b"] == pytest.approx(2.0 / 32.0)
    assert p.loc["b", "a"] == p.loc["a", "b"]
    assert p.loc["a", "c"] == 1.0  # all differences zero
    assert np.isnan(p.loc["a", "a"])


def test_paired_wilcoxon_long_form_and_missing():
    long = pd.DataFrame(
        {
            "replicate": [0, 1, 2, 3, 4] * 2 + [0],
            "method": ["x"] * 5 + ["y"] * 5 + ["z"],
            "euclid": [1.0, 2.0, 3.0, 4.0, 5.0, 2.0, 4.0, 6.0, 8.0, 10.0, 1.0],
        }
    )
    p = paired_wilcoxon(long, value="euclid")
    assert p.loc["x", "y"] == pytest.approx(2.0 / 32.0)
    assert p.loc["x", "z"] == 1.0  # one usable pair, difference 0
    with pytest.raises(SSAInputError, match="lacks"):
        paired_wilcoxon(long, value="manhattan")
