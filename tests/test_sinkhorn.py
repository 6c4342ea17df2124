"""Sinkhorn over kernel blocks against the dense NumPy reference and POT."""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest

from ssa_dask import ConvergenceWarning, kernel_from_array, sinkhorn
from ssa_dask.reference import sinkhorn_dense


def plan_from(kernel_matrix: np.ndarray, p: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    b = np.exp(g / eps)
    a = p / (kernel_matrix @ b)
    return a[:, None] * kernel_matrix * b[None, :]


@pytest.mark.parametrize("block_rows", [257, 64, 100, 1])
def test_kernel_domain_matches_dense_reference_across_chunkings(kernel_problem, block_rows):
    cost, p, q, eps = kernel_problem
    K = np.exp(-cost / eps).astype(np.float32).astype(np.float64)
    a, b, _ = sinkhorn_dense(K, p, q, tol=1e-12)
    result = sinkhorn(kernel_from_array(K, eps=eps, block_rows=block_rows), p, q, tol=1e-7)
    assert result.converged
    reference = a[:, None] * K * b[None, :]
    plan = plan_from(K, p, result.g, eps)
    np.testing.assert_allclose(plan, reference, rtol=2e-5, atol=1e-12)
    np.testing.assert_allclose(plan.sum(1), p, rtol=1e-6)
    np.testing.assert_allclose(plan.sum(0), q, atol=2e-7)
    # the scaling vectors agree up to the usual (a * c, b / c) ambiguity
    scale = np.exp(result.g / eps) / b
    np.testing.assert_allclose(scale / scale[0], 1.0, rtol=2e-5)


def test_single_spot_transports_each_row_mass_to_it(kernel_problem):
    cost, p, _, eps = kernel_problem
    K = np.exp(-cost[:, :1] / eps)
    result = sinkhorn(kernel_from_array(K, eps=eps, block_rows=50), p, np.ones(1), tol=1e-6)
    plan = plan_from(K, p, result.g, eps)
    np.testing.assert_allclose(plan[:, 0], p, rtol=1e-6)


def test_matches_pot_sinkhorn_on_same_kernel_and_marginals(kernel_problem):
    cost, p, q, eps = kernel_problem
    K = np.exp(-cost / eps)
    pot_plan = ot.sinkhorn(p, q, cost, eps, stopThr=1e-12, numItermax=100_000)
    result = sinkhorn(kernel_from_array(K, eps=eps, block_rows=90), p, q, tol=1e-7)
    np.testing.assert_allclose(plan_from(K, p, result.g, eps), pot_plan, rtol=5e-5, atol=1e-11)


def test_log_domain_matches_kernel_domain(kernel_problem):
    cost, p, q, eps = kernel_problem
    K = np.exp(-cost / eps)
    kernel_result = sinkhorn(kernel_from_array(K, eps=eps, block_rows=100), p, q, tol=1e-7)
    log_result = sinkhorn(kernel_from_array(cost, eps=eps, block_rows=100, log_domain=True), p, q, tol=1e-10)
    np.testing.assert_allclose(plan_from(K, p, log_result.g, eps), plan_from(K, p, kernel_result.g, eps), rtol=5e-5, atol=1e-12)


def test_log_domain_converges_where_the_kernel_underflows(kernel_problem):
    cost, p, q, _ = kernel_problem
    eps = 0.005 * cost.max()  # lam = 0.005: exp(-D/eps) reaches exp(-200), below float32's range
    assert np.exp(-cost.max() / eps).astype(np.float32) == 0.0
    result = sinkhorn(kernel_from_array(cost, eps=eps, block_rows=64, log_domain=True), p, q, tol=1e-8, max_iter=20_000)
    assert result.converged
    pot_plan = ot.bregman.sinkhorn_log(p, q, cost, eps, stopThr=1e-11, numItermax=100_000)
    log_plan = np.exp((result.g[None, :] - cost) / eps)
    log_plan *= (p / log_plan.sum(1))[:, None]
    np.testing.assert_allclose(log_plan.sum(0), q, atol=1e-8)
    np.testing.assert_allclose(log_plan, pot_plan, atol=1e-7)


def test_warm_start_from_a_solution_needs_one_iteration(kernel_problem):
    cost, p, q, eps = kernel_problem
    kernel = kernel_from_array(np.exp(-cost / eps), eps=eps, block_rows=100)
    cold = sinkhorn(kernel, p, q, tol=1e-7)
    warm = sinkhorn(kernel, p, q, tol=1e-7, init_g=cold.g)
    assert cold.n_iter > 5
    assert warm.n_iter == 1


def test_errors_decrease_and_max_iter_warns(kernel_problem):
    cost, p, q, eps = kernel_problem
    kernel = kernel_from_array(np.exp(-cost / eps), eps=eps)
    with pytest.warns(ConvergenceWarning, match="max_iter=3"):
        result = sinkhorn(kernel, p, q, tol=1e-12, max_iter=3)
    assert not result.converged and result.n_iter == 3
    assert result.errors[-1] < result.errors[0]


def test_kernel_apply_matches_dense_products(kernel_problem):
    from ssa_dask.cluster import Executor

    cost, p, q, eps = kernel_problem
    K = np.exp(-cost / eps)
    for log_domain, stored in ((False, K), (True, cost)):
        kernel = kernel_from_array(stored, eps=eps, block_rows=70, log_domain=log_domain)
        np.testing.assert_allclose(kernel.apply(q, axis=1, executor=Executor()), K @ q, rtol=1e-5)
        np.testing.assert_allclose(kernel.apply(p, axis=0, executor=Executor()), K.T @ p, rtol=1e-5)


def test_kernel_domain_overflow_is_reported_not_silent(kernel_problem):
    from ssa_dask import SinkhornNumericalError

    cost, p, q, _ = kernel_problem
    eps = 0.001
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kernel = kernel_from_array(np.exp(-cost / eps), eps=eps, max_cost=float(cost.max()))
        with pytest.raises(SinkhornNumericalError, match="log_domain=True"):
            sinkhorn(kernel, p, q, tol=1e-9, max_iter=50)


def test_checkpoint_resumes_where_it_stopped(kernel_problem, tmp_path):
    from ssa_dask import Checkpoint, SSAInputError

    cost, p, q, eps = kernel_problem
    kernel = kernel_from_array(np.exp(-cost / eps), eps=eps, block_rows=100)
    full = sinkhorn(kernel, p, q, tol=1e-7)
    saver = Checkpoint(tmp_path / "state.npz", every=4)
    with pytest.warns(ConvergenceWarning):
        sinkhorn(kernel, p, q, tol=1e-7, max_iter=8, callback=saver)  # "cut off" after 8 iterations
    resumed = sinkhorn(kernel, p, q, tol=1e-7, init_g=saver.load(kernel.shape[1], eps))
    assert resumed.n_iter == full.n_iter - 8
    np.testing.assert_allclose(resumed.g - resumed.g[0], full.g - full.g[0], atol=1e-9)
    with pytest.raises(SSAInputError, match="remove it"):
        saver.load(kernel.shape[1], 2 * eps)
