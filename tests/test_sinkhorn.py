"""Sinkhorn over kernel blocks against the dense NumPy reference and POT.

Every plan is rebuilt densely from the two potentials the pipeline reports, the returned column
potential ``g`` and the row potential ``f`` of :meth:`Kernel.top_k`, as ``exp((f + g - D)/eps)``
with no row update re-applied, so the row and column checks fail for a wrong potential; each such
check is also shown to fail for a slightly perturbed ``g``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import ot
import pytest
from rich.console import Console
from scipy.special import logsumexp

from ssa_dask import Checkpoint, ConvergenceWarning, SinkhornNumericalError, SSAInputError, kernel_from_array, sinkhorn
from ssa_dask.cluster import Executor
from ssa_dask.progress import SinkhornProgress
from ssa_dask.reference import sinkhorn_dense


def row_potential(kernel, p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The row potential ``f`` the pipeline reports for ``g`` (``align``'s ``potential``)."""
    _, _, f = kernel.top_k(p, g, 1, Executor())
    return f


def plan_from_potentials(log_kernel: np.ndarray, f: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """``T = exp(f/eps + log K + g/eps)``, dense float64, nothing renormalised."""
    return np.exp(f[:, None] / eps + log_kernel + g[None, :] / eps)


def assert_solves(log_kernel, f, g, eps, p, q, reference, *, marginal_atol, rtol, atol=0.0):
    """The plan of ``(f, g)`` has marginals ``p``, ``q`` and equals ``reference``."""
    plan = plan_from_potentials(log_kernel, f, g, eps)
    np.testing.assert_allclose(plan.sum(1), p, rtol=1e-6)
    np.testing.assert_allclose(plan.sum(0), q, atol=marginal_atol)
    np.testing.assert_allclose(plan, reference, rtol=rtol, atol=atol)


def assert_solves_and_detects_a_wrong_g(log_kernel, f, g, eps, p, q, reference, **tolerances):
    """:func:`assert_solves` holds for ``(f, g)`` and fails when ``g`` is off by a few percent of eps."""
    assert_solves(log_kernel, f, g, eps, p, q, reference, **tolerances)
    wrong_g = g + 0.02 * eps * np.random.default_rng(0).standard_normal(g.shape)
    with pytest.raises(AssertionError):
        assert_solves(log_kernel, f, wrong_g, eps, p, q, reference, **tolerances)


def pipeline_check(kernel, log_kernel, p, q, result, reference, **tolerances):
    assert_solves_and_detects_a_wrong_g(log_kernel, row_potential(kernel, p, result.g), result.g, kernel.eps, p, q,
                                        reference, **tolerances)


@pytest.mark.parametrize("block_rows", [257, 64, 100, 1])
def test_kernel_domain_matches_dense_reference_across_chunkings(kernel_problem, block_rows):
    cost, p, q, eps = kernel_problem
    K = np.exp(-cost / eps).astype(np.float32).astype(np.float64)
    a, b, _ = sinkhorn_dense(K, p, q, tol=1e-12)
    kernel = kernel_from_array(K, eps=eps, block_rows=block_rows)
    result = sinkhorn(kernel, p, q, tol=1e-7)
    assert result.converged
    reference = a[:, None] * K * b[None, :]
    pipeline_check(kernel, np.log(K), p, q, result, reference, marginal_atol=2e-7, rtol=2e-5, atol=1e-12)
    # the scaling vectors agree up to the usual (a * c, b / c) ambiguity
    scale = np.exp(result.g / eps) / b
    np.testing.assert_allclose(scale / scale[0], 1.0, rtol=2e-5)


@pytest.mark.parametrize("log_domain", [False, True])
def test_single_spot_transports_each_row_mass_to_it(kernel_problem, log_domain):
    cost, p, _, eps = kernel_problem
    D = cost[:, :1].astype(np.float32).astype(np.float64)
    kernel = kernel_from_array(D if log_domain else np.exp(-D / eps), eps=eps, block_rows=50, log_domain=log_domain)
    result = sinkhorn(kernel, p, np.ones(1), tol=1e-6)
    assert result.converged and result.n_iter == 1
    f = row_potential(kernel, p, result.g)
    # closed form: the plan is p itself, so f_i = eps log p_i + D_i0 - g_0
    np.testing.assert_allclose(f, eps * np.log(p) + D[:, 0] - result.g[0], rtol=1e-5, atol=1e-9)
    assert_solves_and_detects_a_wrong_g(-D / eps, f, result.g, eps, p, np.ones(1), p[:, None], marginal_atol=1e-6,
                                        rtol=1e-5)


def test_matches_pot_sinkhorn_on_same_kernel_and_marginals(kernel_problem):
    cost, p, q, eps = kernel_problem
    K = np.exp(-cost / eps)
    pot_plan = ot.sinkhorn(p, q, cost, eps, stopThr=1e-12, numItermax=100_000)
    kernel = kernel_from_array(K, eps=eps, block_rows=90)
    result = sinkhorn(kernel, p, q, tol=1e-7)
    pipeline_check(kernel, np.log(K.astype(np.float32)), p, q, result, pot_plan, marginal_atol=2e-7, rtol=5e-5,
                   atol=1e-11)


def test_log_domain_matches_kernel_domain(kernel_problem):
    cost, p, q, eps = kernel_problem
    K = np.exp(-cost / eps)
    kernel_kernel = kernel_from_array(K, eps=eps, block_rows=100)
    kernel_result = sinkhorn(kernel_kernel, p, q, tol=1e-7)
    log_kernel = kernel_from_array(cost, eps=eps, block_rows=100, log_domain=True)
    log_result = sinkhorn(log_kernel, p, q, tol=1e-10)
    kernel_plan = plan_from_potentials(np.log(K.astype(np.float32)), row_potential(kernel_kernel, p, kernel_result.g),
                                       kernel_result.g, eps)
    pipeline_check(log_kernel, -cost.astype(np.float32) / eps, p, q, log_result, kernel_plan, marginal_atol=1e-9,
                   rtol=5e-5, atol=1e-12)


def test_log_domain_converges_where_the_kernel_underflows(kernel_problem):
    cost, p, q, _ = kernel_problem
    eps = 0.005 * cost.max()  # lam = 0.005: exp(-D/eps) reaches exp(-200), below float32's range
    assert np.exp(-cost.max() / eps).astype(np.float32) == 0.0
    kernel = kernel_from_array(cost, eps=eps, block_rows=64, log_domain=True)
    result = sinkhorn(kernel, p, q, tol=1e-8, max_iter=20_000)
    assert result.converged
    D = cost.astype(np.float32).astype(np.float64)
    pot_plan = ot.bregman.sinkhorn_log(p, q, D, eps, stopThr=1e-11, numItermax=100_000)
    pipeline_check(kernel, -D / eps, p, q, result, pot_plan, marginal_atol=1e-8, rtol=1e-4, atol=1e-9)


def nearly_separable_problem(n_cells: int = 120, n_spots: int = 9):
    """``D = u_i + v_j + eps-scale noise``, float32: Sinkhorn converges in a few iterations at any eps.

    The spread of ``v`` (0.5) puts every column but the cheapest at ``exp(-0.5/eps)`` at the start:
    far below float64's range for ``eps < 7e-4``, where a linear-domain column sum is 0.
    """
    rng = np.random.default_rng(11)
    u, v = rng.random(n_cells), 0.5 * rng.random(n_spots)
    noise = rng.random((n_cells, n_spots))
    p = rng.random(n_cells) + 0.1
    q = rng.random(n_spots) + 0.1
    return u, v, noise, p / p.sum(), q / q.sum()


def log_sinkhorn_dense(D: np.ndarray, p: np.ndarray, q: np.ndarray, eps: float, *, tol: float, max_iter: int = 1000):
    """Textbook float64 log-domain Sinkhorn (alternating LSE updates), returning the plan."""
    f, g = np.zeros(len(p)), np.zeros(len(q))
    for _ in range(max_iter):
        f = eps * np.log(p) - eps * logsumexp((g[None, :] - D) / eps, axis=1)
        log_plan = (f[:, None] + g[None, :] - D) / eps
        if np.abs(np.exp(logsumexp(log_plan, axis=0)) - q).sum() < tol:
            return np.exp(log_plan)
        g = eps * np.log(q) - eps * logsumexp((f[:, None] - D) / eps, axis=0)
    raise AssertionError("reference did not converge")


@pytest.mark.parametrize("lam", [1e-5, 1e-6])
@pytest.mark.parametrize("block_rows", [7, 120])
def test_log_domain_converges_at_tiny_lam(lam, block_rows):
    u, v, noise, p, q = nearly_separable_problem()
    eps = lam  # max D is about 1.5, so lam = eps / max D is below lam
    D = (u[:, None] + v[None, :] + 2 * eps * noise).astype(np.float32).astype(np.float64)
    kernel = kernel_from_array(D, eps=eps, block_rows=block_rows, log_domain=True)
    # what failed before: summed in the linear domain, the first column marginal underflows to 0
    assert np.sum(kernel.column_marginal(p, np.zeros(len(q)), Executor()) == 0) >= len(q) - 1
    tol = 1e-9
    result = sinkhorn(kernel, p, q, tol=tol, max_iter=200)
    assert result.converged and result.n_iter < 50
    reference = log_sinkhorn_dense(D, p, q, eps, tol=1e-10)  # float64 floor: about 1e-11 at eps=1e-6
    pot_plan = ot.bregman.sinkhorn_log(p, q, D, eps, stopThr=1e-11, numItermax=1000)
    np.testing.assert_allclose(pot_plan, reference, rtol=1e-6, atol=1e-15)
    pipeline_check(kernel, -D / eps, p, q, result, reference, marginal_atol=tol, rtol=1e-4, atol=1e-15)


@pytest.mark.parametrize("eps", [0.05, 1e-3, 1e-6])
@pytest.mark.parametrize("block_rows", [1, 13, 300])
def test_log_column_marginal_is_an_exact_log_sum_exp(eps, block_rows):
    rng = np.random.default_rng(5)
    D = (0.5 + 0.5 * rng.random((300, 12))).astype(np.float32)
    D[:, 0] = 0.0  # every cell prefers spot 0 by at least 0.5: the other columns are tiny in every block
    p = rng.random(300) + 0.1
    p /= p.sum()
    g = 1e-3 * rng.standard_normal(12)
    kernel = kernel_from_array(D, eps=eps, block_rows=block_rows, log_domain=True)
    t = (g[None, :] - D.astype(np.float64)) / eps
    expected = logsumexp(np.log(p)[:, None] + t - logsumexp(t, axis=1, keepdims=True), axis=0)
    got = kernel.column_marginal(p, g, Executor(), log=True)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-9)


def test_log_domain_top_k_is_finite_and_ordered_at_tiny_eps():
    rng = np.random.default_rng(2)
    D = rng.random((50, 10)).astype(np.float32)
    p = np.full(50, 1 / 50)
    g = 1e-3 * rng.standard_normal(10)
    eps = 1e-6  # the 2nd and 3rd best entries of each row are exp(-1e3) and below: 0 in float64
    kernel = kernel_from_array(D, eps=eps, block_rows=16, log_domain=True)
    index, probability, f = kernel.top_k(p, g, 3, Executor())
    score = g[None, :] - D.astype(np.float64)
    np.testing.assert_array_equal(index, np.argsort(-score, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(probability[:, 0], 1.0)
    np.testing.assert_allclose(f, eps * np.log(p) - score.max(axis=1), rtol=1e-12, atol=1e-9)


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
    cost, p, q, eps = kernel_problem
    K = np.exp(-cost / eps)
    for log_domain, stored in ((False, K), (True, cost)):
        kernel = kernel_from_array(stored, eps=eps, block_rows=70, log_domain=log_domain)
        np.testing.assert_allclose(kernel.apply(q, axis=1, executor=Executor()), K @ q, rtol=1e-5)
        np.testing.assert_allclose(kernel.apply(p, axis=0, executor=Executor()), K.T @ p, rtol=1e-5)


def test_kernel_domain_overflow_is_reported_not_silent(kernel_problem):
    cost, p, q, _ = kernel_problem
    eps = 0.001
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kernel = kernel_from_array(np.exp(-cost / eps), eps=eps, max_cost=float(cost.max()))
        with pytest.raises(SinkhornNumericalError, match="use log_domain=True"):
            sinkhorn(kernel, p, q, tol=1e-9, max_iter=50)


def test_log_domain_non_finite_blames_the_input_not_the_domain(kernel_problem):
    cost, p, q, eps = kernel_problem
    bad = cost.copy()
    bad[:, 3] = np.inf  # no cell can reach spot 3
    kernel = kernel_from_array(bad, eps=eps, log_domain=True, max_cost=1.0)
    with pytest.raises(SinkhornNumericalError, match="NaN or infinite values") as raised:
        sinkhorn(kernel, p, q, max_iter=5)
    assert "use log_domain=True" not in str(raised.value)


def test_checkpoint_resumes_where_it_stopped_and_counts_its_iterations(kernel_problem, tmp_path):
    cost, p, q, eps = kernel_problem
    kernel = kernel_from_array(np.exp(-cost / eps), eps=eps, block_rows=100)
    full = sinkhorn(kernel, p, q, tol=1e-7)
    saver = Checkpoint(tmp_path / "state.npz", every=4)
    assert saver.resume(kernel.shape[1], eps) is None
    with pytest.warns(ConvergenceWarning):
        sinkhorn(kernel, p, q, tol=1e-7, max_iter=10, callback=saver)  # "cut off" after 10: saved at 8
    state = saver.resume(kernel.shape[1], eps)
    assert state.iteration == 8
    assert [path.name for path in tmp_path.iterdir()] == ["state.npz"]  # nothing left beside it
    seen: list[int] = []
    resumed = sinkhorn(kernel, p, q, tol=1e-7, init_g=state.g, start_iteration=state.iteration,
                       callback=lambda iteration, *_: seen.append(iteration))
    assert resumed.n_iter == full.n_iter and resumed.start_iteration == 8
    assert seen == list(range(9, full.n_iter + 1)) and len(resumed.errors) == full.n_iter - 8
    np.testing.assert_allclose(resumed.errors, full.errors[8:], rtol=1e-9)
    np.testing.assert_allclose(resumed.g - resumed.g[0], full.g - full.g[0], atol=1e-9)
    with pytest.raises(SSAInputError, match="remove it"):
        saver.resume(kernel.shape[1], 2 * eps)
    with pytest.raises(SSAInputError, match="leaves no iteration below max_iter=8"):
        sinkhorn(kernel, p, q, init_g=state.g, start_iteration=state.iteration, max_iter=8)
    saver.path.write_bytes(b"not a checkpoint")
    with pytest.raises(SSAInputError, match="cannot be read.*remove it"):
        saver.resume(kernel.shape[1], eps)


def test_callbacks_run_in_order_and_the_bar_follows_the_iterations(kernel_problem):
    cost, p, q, eps = kernel_problem
    kernel = kernel_from_array(np.exp(-cost / eps), eps=eps, block_rows=100)
    calls: list[tuple[str, int]] = []
    output = io.StringIO()
    with SinkhornProgress(100, start_iteration=2, tol=1e-7, console=Console(file=output, force_terminal=True)) as bar:
        assert bar.is_running and bar.completed == 2
        first, second = (lambda i, *_: calls.append(("first", i))), (lambda i, *_: calls.append(("second", i)))
        result = sinkhorn(kernel, p, q, tol=1e-7, max_iter=100, start_iteration=2, callback=[first, bar, second])
        assert bar.completed == result.n_iter
    assert not bar.is_running
    assert calls == [(name, i) for i in range(3, result.n_iter + 1) for name in ("first", "second")]
    assert "Sinkhorn  err" in output.getvalue() and "tol 1.0e-07" in output.getvalue()


def test_the_bar_stops_when_the_solve_fails(kernel_problem):
    cost, p, q, eps = kernel_problem
    kernel = kernel_from_array(np.exp(-cost / eps), eps=eps)

    def interrupt(iteration, *_):
        if iteration == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with SinkhornProgress(50, console=Console(file=io.StringIO(), force_terminal=True)) as bar:
            sinkhorn(kernel, p, q, max_iter=50, callback=[bar, interrupt])
    assert not bar.is_running and bar.completed == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_iter": 0}, "max_iter must be at least 1, got 0"),
        ({"max_iter": -5}, "max_iter must be at least 1"),
        ({"max_iter": 2.5}, "max_iter must be an integer"),
        ({"tol": 0.0}, "tol must be a positive finite number"),
        ({"tol": -1e-6}, "tol must be a positive finite number"),
        ({"tol": float("nan")}, "tol must be a positive finite number"),
        ({"tol": float("inf")}, "tol must be a positive finite number"),
        ({"start_iteration": -1}, "start_iteration must be at least 0"),
        ({"init_g": np.zeros(30)}, r"init_g has shape \(30,\), expected \(31,\)"),
        ({"init_g": np.full(31, np.nan)}, "init_g holds 31 NaN or infinite"),
        ({"p": np.full(257, 1 / 300)}, "p sums to 0.856666667, not 1"),
        ({"p": np.r_[0.0, np.full(256, 1 / 256)]}, "p must be positive and finite: 1 cell mass"),
        ({"p": np.full(200, 1 / 200)}, r"p has shape \(200,\), expected \(257,\)"),
        ({"q": np.r_[np.nan, np.full(30, 1 / 30)]}, "q must be positive and finite: 1 spot mass"),
        ({"q": np.full(31, 1 / 30)}, "q sums to 1.03333333, not 1"),
        ({"callback": [print, "not callable"]}, "callback must be a callable"),
    ],
)
def test_bad_arguments_are_named_before_any_iteration(kernel_problem, change, message):
    cost, p, q, eps = kernel_problem
    arguments = {"p": p, "q": q, **change}
    kernel = kernel_from_array(np.exp(-cost / eps), eps=eps)
    with pytest.raises(SSAInputError, match=message):
        sinkhorn(kernel, **arguments)
