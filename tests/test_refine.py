"""The refined mode (issue 12): blockwise on the kernel storage == the dense float64 reference."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

import ssa_dask
from ssa_dask.cli import app
from ssa_dask.cluster import Executor
from ssa_dask.errors import SSAInputError
from ssa_dask.kernel.build import build_kernel
from ssa_dask.reference import feature_scaling, refine_dense, refine_direction, ssa_dense
from ssa_dask.refine import refine
from ssa_dask.sinkhorn import sinkhorn

TOL = 1e-7
BLOCK = 64


@pytest.fixture
def problem(counts_problem):
    """The counts problem over its selected genes, with the dense SSA solution."""
    sc, spots = counts_problem
    dense = ssa_dense(sc, spots, tol=TOL)
    return sc[:, dense.genes], spots[:, dense.genes], dense


def _masses(sc, spots):
    return sc.sum(1) / sc.sum(), spots.sum(1) / spots.sum()


def test_gradient_is_the_derivative_of_the_loss():
    """G_ij = X_i . W_j - c_j against central differences of L(T) = -O(diag(1/s) T^T X) (dense, independent)."""
    rng = np.random.default_rng(0)
    T, X, S = rng.random((12, 4)) + 0.1, rng.normal(size=(12, 6)), rng.normal(size=(4, 6))
    train = np.array([True, True, False, True, True, True])

    def loss(plan):
        return -refine_direction(plan.T @ X, plan.sum(0), S, train)[0]

    _, _, W, c = refine_direction(T.T @ X, T.sum(0), S, train)
    gradient = X @ W.T - c
    numeric = np.zeros_like(T)
    for i, j in np.ndindex(*T.shape):
        step = np.zeros_like(T)
        step[i, j] = 1e-6
        numeric[i, j] = (loss(T + step) - loss(T - step)) / 2e-6
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-8)
    assert not np.allclose(gradient, -numeric, atol=1e-3)  # the sign is checked too


def _kernel(cost, eps, storage, log_domain, tmp_path):
    cost_blocks = da.from_array(cost.astype(np.float32), chunks=(BLOCK, cost.shape[1]))
    return build_kernel(cost_blocks, Executor(), lam=None, eps=eps, log_domain=log_domain, storage=storage, path=tmp_path)


@pytest.mark.parametrize("storage", ["memory", "zarr"])
@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("variant", ["plain", "input+tau+csr", "held-out"])
def test_blockwise_refine_equals_the_dense_reference(problem, storage, log_domain, variant, tmp_path, monkeypatch):
    sc, spots, dense = problem
    if variant == "input+tau+csr":  # keep the CSR blocks sparse in the products (the counts are dense enough to densify)
        monkeypatch.setattr("ssa_dask._refine_blocks.DENSIFY_ABOVE_DENSITY", 1.0)
    p, q = _masses(sc, spots)
    features = "input" if variant == "input+tau+csr" else "zscore"
    tau = 0.2 if variant == "input+tau+csr" else 0.0
    held_out, patience, steps = (np.array([1, 5, 9]), 1, 8) if variant == "held-out" else (None, None, 4)
    kernel = _kernel(dense.cost, dense.eps, storage, log_domain, tmp_path)
    executor = Executor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solved = sinkhorn(kernel, p, q, tol=TOL, max_iter=5000, executor=executor)
    cells = sp.csr_matrix(sc) if variant == "input+tau+csr" else sc
    X = da.from_array(cells, chunks=(BLOCK, sc.shape[1]), asarray=False)
    try:
        result = refine(kernel, solved, p, q, X, spots, cell_stats=(sc.mean(0), sc.std(0)), features=features,
                        steps=steps, tol=TOL, tau=tau, held_out=held_out, patience=patience, executor=executor)
        spot, probability, _ = kernel.top_k(p, result.kernel_g, 1, executor)
    finally:
        kernel.close()
    expected = refine_dense(dense.cost, p, q, dense.eps, sc, spots, solved.g, steps=steps, tol=TOL, tau=tau,
                            features=features, held_out=held_out, patience=patience)
    assert result.steps == expected.steps >= 2
    np.testing.assert_allclose(result.objective, expected.objective, rtol=1e-7, atol=1e-9)
    if held_out is not None:
        np.testing.assert_allclose(result.held_out_score, expected.held_out, rtol=1e-7, atol=1e-9)
        assert result.steps < steps  # stopped early on the held-out genes
    np.testing.assert_allclose(result.A, expected.A, rtol=0, atol=1e-5 * np.abs(expected.A).max())
    np.testing.assert_allclose(result.a, expected.a, rtol=0, atol=1e-5 * np.abs(expected.a).max())
    np.testing.assert_allclose(result.g, expected.g, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(spot[:, 0], expected.spot)
    np.testing.assert_allclose(probability[:, 0], expected.plan.max(1) / expected.plan.sum(1), rtol=1e-4)
    assert expected.objective[-1] > expected.objective[0]  # the steps do what they are for
    # Negative control: one step fewer is a different refinement, far outside the tolerances above.
    fewer = refine_dense(dense.cost, p, q, dense.eps, sc, spots, solved.g, steps=result.steps - 1, tol=TOL, tau=tau,
                         features=features, held_out=held_out)
    assert np.abs(fewer.A - result.A).max() > 1e-2 * np.abs(expected.A).max()
    assert abs(fewer.objective[-1] - result.objective[-1]) > 1e-6


def test_refined_cost_is_reproducible_from_a_and_A(problem):
    sc, spots, dense = problem
    p, q = _masses(sc, spots)
    refined = refine_dense(dense.cost, p, q, dense.eps, sc, spots, dense.eps * np.log(dense.b), steps=3, tau=0.1)
    np.testing.assert_allclose(refined.cost, dense.cost + sc @ refined.A.T - refined.a, atol=1e-12)
    np.testing.assert_allclose(refined.plan.sum(1), p, rtol=1e-10)
    scale, shift = feature_scaling(sc.mean(0), sc.std(0), "zscore")
    np.testing.assert_allclose(scale, 1 / sc.std(0))
    np.testing.assert_allclose(shift, sc.mean(0) / sc.std(0))


def _align(sc, spots, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ssa_dask.align(sc, spots, tol=TOL, max_iter=5000, block_rows=BLOCK, **kwargs)


def _dense_refined(counts_problem, result, steps, **kwargs):
    sc, spots = counts_problem
    dense = ssa_dense(sc, spots, tol=TOL)
    p, q = _masses(sc, spots)
    base_g = _align(sc, spots)["column_potential"].values
    return refine_dense(dense.cost, p, q, dense.eps, sc[:, dense.genes], spots[:, dense.genes], base_g, steps=steps,
                        tol=TOL, **kwargs)


@pytest.mark.parametrize("storage", ["zarr", "memory"])
def test_align_refines_on_a_local_cluster(counts_problem, cluster_client, storage, tmp_path):
    sc, spots = counts_problem
    result = _align(sc, spots, refine=3, client=cluster_client, kernel_storage=storage, kernel_path=str(tmp_path))
    expected = _dense_refined(counts_problem, result, 3)
    assert result.attrs["refine_steps"] == 3 and result.attrs["refine"] == "3"
    assert (result.attrs["refine_eta"], result.attrs["refine_inner"]) == (5.0, 20)
    np.testing.assert_allclose(result.attrs["refine_objective"], expected.objective, rtol=1e-7)
    np.testing.assert_array_equal(result["spot"].values, expected.spot)
    np.testing.assert_allclose(result["refine_A"].values, expected.A, atol=1e-5 * np.abs(expected.A).max())
    assert list(tmp_path.iterdir()) == []  # the kernel store and its refined copies are removed


def test_lazy_plan_of_a_refined_result_is_the_refined_plan(counts_problem, tmp_path):
    sc, spots = counts_problem
    result = _align(sc, spots, refine=3)
    ssa_dask.write_result(result, str(tmp_path / "refined.zarr"))
    expected = _dense_refined(counts_problem, result, 3)
    with ssa_dask.open_plan(str(tmp_path / "refined.zarr"), sc, spots) as plan:
        T = plan.apply(np.eye(len(sc)), axis=0).T
    np.testing.assert_allclose(T, expected.plan, rtol=0, atol=1e-5 * expected.plan.max())
    # Negative control: the refinement left out of the result is refused (its plan is not the result's).
    with pytest.raises(SSAInputError, match="does not match the result"):
        ssa_dask.open_plan(result.drop_vars(["refine_A", "refine_a"]), sc, spots)


def test_refine_auto_stops_on_held_out_genes(counts_problem):
    from ssa_dask.refine import AUTO_MAX_STEPS, AUTO_PATIENCE, refine_schedule

    sc, spots = counts_problem
    result = _align(sc, spots, refine="auto")
    steps, held_out, patience = refine_schedule("auto", result.sizes["gene"])
    expected = _dense_refined(counts_problem, result, steps, held_out=held_out, patience=patience)
    assert result.attrs["refine"] == "auto"
    assert result.attrs["refine_steps"] == expected.steps <= AUTO_MAX_STEPS
    scores = result.attrs["refine_held_out_cosine"]
    np.testing.assert_allclose(scores, expected.held_out, rtol=1e-6)  # the refined blocks are float32
    if expected.steps < AUTO_MAX_STEPS:
        assert max(scores[-AUTO_PATIENCE:]) <= max(scores[:-AUTO_PATIENCE])


def test_refine_none_is_the_ssa_method_unchanged(counts_problem):
    sc, spots = counts_problem
    default, explicit = _align(sc, spots), _align(sc, spots, refine=None)
    for result in (default, explicit):
        del result.attrs["sinkhorn_seconds"]  # wall time
    assert default.identical(explicit)
    assert not [name for name in (*default.data_vars, *default.attrs) if name.startswith("refine")]
    np.testing.assert_array_equal(default["spot"].values, ssa_dense(sc, spots, tol=TOL).spot)
    assert not np.array_equal(_align(sc, spots, refine=3)["spot"].values, default["spot"].values)


@pytest.mark.parametrize("options, message", [
    ({"refine": 0}, "refine must be None, a positive number"),
    ({"refine": -1}, "refine must be None, a positive number"),
    ({"refine": "x"}, "refine must be None, a positive number"),
    ({"refine": True}, "refine must be None, a positive number"),
    ({"refine": 2, "refine_eta": 0}, "refine_eta must be a positive finite number"),
    ({"refine": 2, "refine_eta": float("nan")}, "refine_eta must be a positive finite number"),
    ({"refine": 2, "refine_inner": 0}, "refine_inner must be a positive integer"),
])
def test_align_refuses_bad_refine_options_before_reading(options, message, tmp_path):
    with pytest.raises(SSAInputError, match=message):
        ssa_dask.align(str(tmp_path / "absent.h5ad"), str(tmp_path / "absent.h5ad"), **options)


@pytest.fixture
def h5ad_inputs(tmp_path, counts_problem):
    import anndata as ad
    import pandas as pd

    sc, spots = counts_problem
    genes = pd.DataFrame(index=[f"g{i}" for i in range(sc.shape[1])])
    ad.AnnData(sc.astype(np.float32), var=genes).write_h5ad(tmp_path / "sc.h5ad")
    ad.AnnData(spots.astype(np.float32), var=genes).write_h5ad(tmp_path / "spots.h5ad")
    return tmp_path / "sc.h5ad", tmp_path / "spots.h5ad"


@pytest.mark.parametrize("args, message", [
    (["--refine", "0"], r"--refine must be a positive number of steps or 'auto', got '0'"),
    (["--refine", "-1"], r"--refine must be a positive number of steps or 'auto'"),
    (["--refine", "x"], r"--refine must be a positive number of steps or 'auto', got 'x'"),
    (["--refine", "2", "--refine-eta", "0"], r"--refine-eta must be a positive finite number"),
    (["--refine", "2", "--refine-inner", "0"], r"--refine-inner must be a positive integer"),
])
def test_cli_refuses_bad_refine_options(h5ad_inputs, tmp_path, args, message):
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(app, ["align", *map(str, h5ad_inputs), "-o", str(out), *args], env={"COLUMNS": "250"})
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")][0].find("--refine") > 0
    import re

    assert re.search(message, result.output), result.output
    assert not out.exists()


def test_cli_refine_records_the_steps(h5ad_inputs, tmp_path):
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(app, ["align", *map(str, h5ad_inputs), "-o", str(out), "--scheduler", "threads",
                                      "--refine", "2", "--refine-inner", "5"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    stored = ssa_dask.open_result(str(out))
    assert (stored.attrs["refine_steps"], stored.attrs["refine_inner"]) == (2, 5)
    assert len(stored.attrs["refine_objective"]) == 3
    assert stored["refine_A"].dims == ("spot_id", "gene")


@pytest.mark.parametrize("log_domain", [False, True])
def test_a_retried_chunk_rewrite_writes_the_same_bytes(problem, tmp_path, log_domain):
    """The Zarr pass B reads one array and writes another: running a task twice changes nothing."""
    from ssa_dask._refine_blocks import cost_increment, rewrite_stored
    from ssa_dask.kernel.store import KernelStore

    sc, spots, dense = problem
    store = KernelStore.create(tmp_path, dense.cost.shape, np.array([0, BLOCK, len(sc)]))
    source, target = store.blocks("cost.zarr")[0], store.blocks("kernel.zarr")[0]
    held = dense.cost[:BLOCK] if log_domain else np.exp(-dense.cost[:BLOCK] / dense.eps)
    source.write(held.astype(np.float32))
    B, b = np.random.default_rng(1).normal(size=spots.shape) * 1e-3, np.full(len(spots), 0.01)
    p, g = np.full(BLOCK, 1.0 / len(sc)), np.linspace(-0.01, 0.01, len(spots))
    options = dict(g=g, B=B, b=b, eps=dense.eps, log_domain=log_domain)
    f = rewrite_stored(source, sc[:BLOCK], p, target, **options)
    first = target.file.read_bytes()
    again = rewrite_stored(source, sc[:BLOCK], p, target, **options)
    assert target.file.read_bytes() == first
    np.testing.assert_array_equal(source.load(), held.astype(np.float32))  # the input is untouched
    cost = dense.cost[:BLOCK] + cost_increment(sc[:BLOCK], B, b)
    if log_domain:
        assert f is None and again is None
        np.testing.assert_allclose(target.load(), cost, rtol=1e-6, atol=1e-7)
    else:
        # The kernel domain absorbs the potentials: exp((f_i + g_j - C_ij)/eps), rows summing to p.
        np.testing.assert_array_equal(f, again)
        expected = np.exp((f[:, None] + g[None, :] - cost) / dense.eps)
        np.testing.assert_allclose(target.load(), expected, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(target.load().sum(1), p, rtol=1e-5)
    store.remove()
