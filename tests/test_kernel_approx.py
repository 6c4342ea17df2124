"""The sparse multiscale kernel (support + far field) against dense NumPy references.

Every kernel operation is checked against the dense matrix ``K~`` the packed blocks stand for
(support values, ``kappa_i`` elsewhere), the build against the exact cost of
:func:`ssa_dask.reference.pearson_cost`, and the whole solve against :func:`ssa_dask.reference.ssa_dense`:
equal when nothing is truncated, within measured bounds when it is.
"""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest

import ssa_dask
from ssa_dask import SSAInputError, sinkhorn
from ssa_dask.kernel._sparse_block_math import (
    apply_columns_sparse,
    apply_rows_sparse,
    column_marginal_sparse_block,
    dense_rows,
    pack_block,
    top_k_sparse_block,
    unpack_block,
)
from ssa_dask.cluster import Executor
from ssa_dask.cost import PearsonCost
from ssa_dask.kernel.multiscale import (
    ApproximationWarning,
    SpotClusters,
    build_multiscale_kernel,
    check_sparse_options,
    check_support,
    cluster_spots,
    support_block,
)
from ssa_dask.reference import pearson_cost, ssa_dense


@pytest.fixture(scope="module")
def typed_problem() -> tuple[np.ndarray, np.ndarray]:
    """600 cells and 120 spots over 40 genes: 6 cell types, spots are noisy mixtures of 1-2 types."""
    rng = np.random.default_rng(5)
    n_types, genes = 6, 40
    programmes = rng.gamma(0.6, 3.0, size=(n_types, genes))
    cell_type = rng.integers(0, n_types, 600)
    sc = rng.poisson(programmes[cell_type] * rng.gamma(4.0, 0.5, size=(600, 1))).astype(np.float64)
    mix = rng.dirichlet(np.full(n_types, 0.2), size=120)
    spots = rng.poisson(15 * mix @ programmes).astype(np.float64)
    return sc, spots


def _cost_of(sc: np.ndarray, spots: np.ndarray) -> PearsonCost:
    return PearsonCost.from_statistics(sc.mean(0), sc.std(0), spots, spots.mean(0), spots.std(0))


def _masses(sc: np.ndarray, spots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return sc.sum(1) / sc.sum(), spots.sum(1) / spots.sum()


def _dense_of(blocks: list[np.ndarray], n_spots: int) -> np.ndarray:
    """The dense ``K~`` of packed blocks: ``kappa_i`` everywhere, the support's values on it."""
    return np.concatenate([dense_rows(block, n_spots) for block in blocks])


def _random_block(rng: np.random.Generator, n: int, k: int, n_spots: int, kappa_scale: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A packed block of random support values, spots and far field, and the dense matrix it stands for."""
    spots = np.stack([rng.choice(n_spots, k, replace=False) for _ in range(n)])
    far = (rng.random(n) * kappa_scale).astype(np.float32)
    values = (rng.random((n, k)) + 0.1).astype(np.float32)
    dense = np.empty((n, n_spots))
    for i in range(n):
        dense[i] = far[i]
        dense[i, spots[i]] = values[i]
    return pack_block(values, spots, far), dense


# ----------------------------------------------------------------------------- per-block maths
@pytest.mark.parametrize("kappa_scale", [0.0, 0.05])
def test_block_maths_match_the_dense_matrix_they_stand_for(kappa_scale):
    rng = np.random.default_rng(0)
    n_spots, eps = 40, 0.1
    block, K = _random_block(rng, 25, 7, n_spots, kappa_scale)
    np.testing.assert_array_equal(dense_rows(block, n_spots), K)
    p = rng.random(25) + 0.1
    g = rng.standard_normal(n_spots) * 0.05
    b = np.exp((g - g.max()) / eps)
    a = p / (K @ b)
    np.testing.assert_allclose(column_marginal_sparse_block(block, p, g, eps, n_spots), b * (K.T @ a), rtol=1e-5)
    v = rng.random(n_spots)
    np.testing.assert_allclose(apply_rows_sparse(block, v), K @ v, rtol=1e-6)
    w = rng.random(25)
    np.testing.assert_allclose(apply_columns_sparse(block, w, n_spots), K.T @ w, rtol=1e-6)
    out = top_k_sparse_block(block, p, g, eps, 3)
    plan = a[:, None] * K * b[None, :]
    values, spots, _ = unpack_block(block)
    support_plan = np.take_along_axis(plan, spots, axis=1)
    expected = np.take_along_axis(spots, np.argsort(-support_plan, axis=1)[:, :3], axis=1)
    np.testing.assert_array_equal(out[:, :3], expected)
    np.testing.assert_allclose(out[:, 3:6], np.take_along_axis(plan, expected, axis=1) / p[:, None], rtol=1e-5)
    f = out[:, -1]  # a = exp(f / eps) with the un-shifted b = exp(g / eps)
    np.testing.assert_allclose(np.exp(f / eps) * (K @ np.exp(g / eps)), p, rtol=1e-5)


# ----------------------------------------------------------------------------- build
def test_support_is_the_exact_top_k_when_every_cluster_is_probed(typed_problem):
    sc, spots = typed_problem
    cost = _cost_of(sc, spots)
    clusters = cluster_spots(cost.spot_profiles, 10)
    exact = pearson_cost(sc, spots)
    packed = support_block(sc, cost, clusters, n_probe=10, n_support=8, eps=0.05)
    values, kept, far = unpack_block(packed)
    expected = np.sort(np.argsort(exact, axis=1, kind="stable")[:, :8], axis=1)
    assert (np.sort(kept, axis=1) == expected).all(axis=1).mean() > 0.99  # float32 ties aside
    np.testing.assert_allclose(values, np.exp(-np.take_along_axis(exact, kept, axis=1) / 0.05), rtol=1e-4)
    assert np.all(far == 0)  # no far field asked for
    # negative control: probing one cluster of ten misses part of the exact top 8
    _, narrow, _ = unpack_block(support_block(sc, cost, clusters, n_probe=1, n_support=8, eps=0.05))
    assert (np.sort(narrow, axis=1) == expected).all(axis=1).mean() < 0.9


def test_one_spot_per_cluster_and_all_probed_is_the_dense_kernel(typed_problem):
    sc, spots = typed_problem
    cost = _cost_of(sc, spots)
    n_spots = spots.shape[0]
    singletons = SpotClusters(directions=cost.spot_profiles.copy(), order=np.arange(n_spots, dtype=np.int32),
                              offsets=np.arange(n_spots + 1, dtype=np.int64), profiles=cost.spot_profiles.T.copy())
    packed = support_block(sc, cost, singletons, n_probe=n_spots, n_support=n_spots, eps=0.05, n_far=16)
    np.testing.assert_allclose(_dense_of([packed], n_spots), np.exp(-pearson_cost(sc, spots) / 0.05), rtol=1e-4)


def test_far_field_is_the_mean_kernel_off_the_support(typed_problem):
    sc, spots = typed_problem
    cost = _cost_of(sc, spots)
    n_spots = spots.shape[0]
    clusters = cluster_spots(cost.spot_profiles, 10)
    packed = support_block(sc, cost, clusters, n_probe=3, n_support=20, eps=0.05, n_far=n_spots)
    values, kept, far = unpack_block(packed)
    K = np.exp(-pearson_cost(sc, spots) / 0.05)
    off = np.ones_like(K, dtype=bool)
    np.put_along_axis(off, kept, False, axis=1)
    np.testing.assert_allclose(far, (K * off).sum(1) / off.sum(1), rtol=1e-4)  # all spots drawn: the exact mean
    # 30 drawn spots give an estimate, not the mean; unbiased: over many draws it averages to the mean
    draws = np.array([unpack_block(support_block(sc, cost, clusters, n_probe=3, n_support=20, eps=0.05, n_far=30,
                                                 seed=seed))[2] for seed in range(40)])
    assert not np.allclose(draws[0], far, rtol=1e-2)
    np.testing.assert_allclose(draws.mean(0).mean(), far.mean(), rtol=0.1)


def test_full_support_solves_the_dense_reference(typed_problem):
    sc, spots = typed_problem
    reference = ssa_dense(sc, spots, n_genes=40, tol=1e-10)
    cost = _cost_of(sc[:, reference.genes], spots[:, reference.genes])
    X = da.from_array(sc[:, reference.genes], chunks=(250, -1))
    kernel, check = build_multiscale_kernel(X, cost, Executor(), n_support=spots.shape[0], n_sample=10_000)
    assert isinstance(kernel.storage, ssa_dask.KernelStorage) and check.rows.size == sc.shape[0]
    np.testing.assert_allclose(kernel.eps, reference.eps, rtol=1e-5)  # every cell sampled: the exact max D
    p, q = _masses(sc, spots)
    result = sinkhorn(kernel, p, q, tol=1e-8)
    K = _dense_of(kernel.blocks, spots.shape[0])
    b = np.exp((result.g - result.g.max()) / kernel.eps)
    plan = (p / (K @ b))[:, None] * K * b
    assert np.abs(plan - reference.plan).sum() < 1e-5
    spot, probability, _ = kernel.top_k(p, result.g, 1, Executor())
    np.testing.assert_array_equal(spot[:, 0], reference.spot)
    np.testing.assert_allclose(probability[:, 0], reference.probability, rtol=1e-4)
    check_support(check, X, cost, kernel, result.g, Executor())
    assert check.passed and np.allclose(check.support_mass, 1.0) and check.best_in_support.all()


def _truncated_solve(sc, spots, reference, n_support, n_far):
    cost = _cost_of(sc[:, reference.genes], spots[:, reference.genes])
    X = da.from_array(sc[:, reference.genes], chunks=(300, -1))
    kernel, check = build_multiscale_kernel(X, cost, Executor(), n_support=n_support, n_far=n_far, n_clusters=10,
                                            n_sample=10_000)
    p, q = _masses(sc, spots)
    result = sinkhorn(kernel, p, q, tol=1e-7)
    K = _dense_of(kernel.blocks, spots.shape[0])
    b = np.exp((result.g - result.g.max()) / kernel.eps)
    plan = (p / (K @ b))[:, None] * K * b
    spot = kernel.top_k(p, result.g, 1, Executor())[0][:, 0]
    return plan, spot, check_support(check, X, cost, kernel, result.g, Executor())


def test_truncated_support_with_far_field_stays_within_bounds_of_the_dense_plan(typed_problem):
    sc, spots = typed_problem
    reference = ssa_dense(sc, spots, n_genes=40, tol=1e-10)
    plan, spot, check = _truncated_solve(sc, spots, reference, n_support=30, n_far=60)
    np.testing.assert_allclose(plan.sum(0), reference.plan.sum(0), atol=1e-6)  # the marginals hold exactly
    far_l1 = np.abs(plan - reference.plan).sum()
    assert far_l1 < 0.06  # measured 0.031 (the plans sum to 1, so the L1 lies in [0, 2])
    assert (spot == reference.spot).mean() > 0.95  # measured 0.983
    assert check.passed
    # the check's agreement on its sample tracks the true one (here every cell is sampled)
    assert abs(check.best_in_support.mean() - (spot == reference.spot).mean()) < 0.05
    # negative control: the same support without a far field drops the plan's diffuse mass
    plan0, _, _ = _truncated_solve(sc, spots, reference, n_support=30, n_far=0)
    assert np.abs(plan0 - reference.plan).sum() > 1.5 * far_l1  # measured 0.059


# ----------------------------------------------------------------------------- pipeline
def test_align_multiscale_with_every_spot_kept_matches_the_reference(counts_problem):
    sc, spots = counts_problem
    ds = ssa_dask.align(sc, spots, n_genes=30, kernel="multiscale", n_support=spots.shape[0], tol=1e-8)
    reference = ssa_dense(sc, spots, n_genes=30, tol=1e-11)
    np.testing.assert_array_equal(ds["spot"].values, reference.spot)
    np.testing.assert_allclose(ds["probability"].values, reference.probability, rtol=5e-4)
    assert ds.attrs["kernel_storage"] == "multiscale" and ds.attrs["check_passed"]
    assert ds.attrs["best_spot_agreement"] == 1.0


def test_align_multiscale_on_a_cluster_equals_local_threads(counts_problem, cluster_client):
    sc, spots = counts_problem
    options = dict(n_genes=30, kernel="multiscale", n_support=10, tol=1e-7, block_rows=100)
    local = ssa_dask.align(sc, spots, **options)
    remote = ssa_dask.align(sc, spots, client=cluster_client, **options)  # blocks are futures on the workers
    np.testing.assert_array_equal(remote["spot"].values, local["spot"].values)
    np.testing.assert_allclose(remote["probability"].values, local["probability"].values, rtol=1e-5)
    assert remote.attrs["best_spot_agreement"] == local.attrs["best_spot_agreement"]


def test_align_multiscale_warns_when_the_support_is_too_small(typed_problem):
    sc, spots = typed_problem
    with pytest.warns(ApproximationWarning, match="larger n_support"):
        ds = ssa_dask.align(sc, spots, n_genes=40, kernel="multiscale", n_support=1, tol=1e-6)
    assert not ds.attrs["check_passed"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ApproximationWarning)  # negative control: a wide support passes
        ssa_dask.align(sc, spots, n_genes=40, kernel="multiscale", n_support=60, tol=1e-6)


@pytest.mark.parametrize(("options", "message"), [
    (dict(kernel="sparse"), "kernel must be"),
    (dict(kernel="multiscale", n_support=0), "n_support must be"),
    (dict(kernel="multiscale", n_support=2, top_k=3), "top_k=3 exceeds"),
    (dict(kernel="multiscale", log_domain=True), "kernel domain only"),
])
def test_bad_options_are_refused_before_compute(counts_problem, options, message):
    sc, spots = counts_problem
    with pytest.raises(SSAInputError, match=message):
        ssa_dask.align(sc, spots, **options)
    kernel = options.get("kernel")
    with pytest.raises(SSAInputError, match=message):
        check_sparse_options(kernel, options.get("n_support", 8), options.get("top_k", 1),
                             options.get("log_domain", "auto"))


def test_small_lam_and_constant_cells_are_refused(counts_problem):
    sc, spots = counts_problem
    with pytest.raises(SSAInputError, match="no log domain"):
        ssa_dask.align(sc, spots, n_genes=30, kernel="multiscale", n_support=5, lam=0.01)
    constant = sc.copy()
    constant[7] = np.delete(sc, 7, axis=0).mean(0)  # every gene at its mean: the z-profile is all zeros
    with pytest.raises(SSAInputError, match="constant z-profile"):
        ssa_dask.align(constant, spots, n_genes=30, kernel="multiscale", n_support=5)


def test_cli_kernel_multiscale_equals_the_api_and_refuses_bad_options(tmp_path, counts_problem):
    from typer.testing import CliRunner

    from ssa_dask.cli import app
    from test_cli import _write_counts

    sc, spots = counts_problem
    sc_path, spots_path = _write_counts(tmp_path, counts_problem)
    out = tmp_path / "res.zarr"
    runner = CliRunner()
    args = ["align", str(sc_path), str(spots_path), "-o", str(out), "--scheduler", "threads", "--kernel", "multiscale"]
    result = runner.invoke(app, [*args, "--n-support", "10"])
    assert result.exit_code == 0, result.output
    ds = ssa_dask.read_result(str(out))
    direct = ssa_dask.align(sc, spots, kernel="multiscale", n_support=10)
    np.testing.assert_array_equal(ds["spot"].values, direct["spot"].values)
    assert ds.attrs["kernel_storage"] == "multiscale" and ds.attrs["n_support"] == 10
    refused = runner.invoke(app, [*args, "--n-support", "2", "--top-k", "3", "--overwrite"])
    assert refused.exit_code == 2 and "top_k=3 exceeds" in refused.output
