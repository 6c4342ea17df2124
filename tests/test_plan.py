"""The lazy transport plan equals the dense NumPy plan of the same problem, and refuses other inputs."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import ssa_dask
from ssa_dask.errors import SSAInputError
from ssa_dask.plan import TransportPlan, open_plan
from ssa_dask.reference import ssa_dense

from plan_problems import as_anndata, make_problem

N_GENES_USED = 30  # of 40: the plan must recompute the cost over the result's genes only


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """Inputs in memory and as .h5ad, the align result, and the dense reference plan."""
    sc, spots, coords, cell_type = make_problem()
    cells, spot_data = as_anndata(sc, spots, coords)
    folder = tmp_path_factory.mktemp("plan")
    cells.write_h5ad(folder / "cells.h5ad")
    spot_data.write_h5ad(folder / "spots.h5ad")
    result = ssa_dask.align(cells, spot_data, n_genes=N_GENES_USED, tol=1e-7, block_rows=70)
    ssa_dask.write_result(result, str(folder / "result.zarr"))
    reference = ssa_dense(sc, spots, n_genes=N_GENES_USED, tol=1e-12)
    return {"sc": sc, "spots": spots, "coords": coords, "cell_type": cell_type, "cells": cells, "spot_data": spot_data,
            "folder": folder, "result": result, "reference": reference}


def open_for(problem, backend, inputs, cluster_client, **options) -> TransportPlan:
    client = cluster_client if backend == "cluster" else None
    if inputs == "h5ad":
        folder = problem["folder"]
        return open_plan(str(folder / "result.zarr"), str(folder / "cells.h5ad"), str(folder / "spots.h5ad"),
                         client=client, **options)
    return open_plan(problem["result"], problem["cells"], problem["spot_data"], client=client, **options)


@pytest.fixture(params=[("threads", "memory"), ("cluster", "h5ad"), ("threads", "h5ad"), ("cluster", "memory")],
                ids=lambda p: "-".join(p))
def backend_inputs(request):
    backend, inputs = request.param
    if backend == "cluster":
        request.getfixturevalue("cluster_client")
    return backend, inputs


class WarningRecords(logging.Handler):
    """Warnings logged to a logger that does not propagate to the root (``distributed`` does not)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def distributed_warnings():
    """Warnings that ``distributed`` logs during a test (its logger does not reach caplog)."""
    records = WarningRecords()
    logger = logging.getLogger("distributed")
    logger.addHandler(records)
    yield records.messages
    logger.removeHandler(records)


def test_plan_equals_the_dense_plan(problem, backend_inputs, request, distributed_warnings):
    backend, inputs = backend_inputs
    client = request.getfixturevalue("cluster_client") if backend == "cluster" else None
    T = problem["reference"].plan
    P = T / T.sum(1, keepdims=True)
    rng = np.random.default_rng(0)
    V_cells, V_spots = rng.random((T.shape[0], 3)), rng.random((T.shape[1], 2))  # positive: no cancellation in the sums
    with warnings.catch_warnings(record=True) as caught, open_for(problem, backend, inputs, client, block_rows=64) as plan:
        assert plan.shape == T.shape and len(plan.row_chunks) == 5
        assert plan.executor.distributed == (backend == "cluster")
        np.testing.assert_allclose(plan.apply(V_cells, axis=0), T.T @ V_cells, rtol=1e-4)
        np.testing.assert_allclose(plan.apply(sp.csr_matrix(V_cells), axis=0), T.T @ V_cells, rtol=1e-4)
        np.testing.assert_allclose(plan.apply(V_spots, axis=1), T @ V_spots, rtol=1e-4, atol=1e-12)
        np.testing.assert_allclose(plan.apply(V_spots[:, 0], axis=1, normalize=True), P @ V_spots[:, 0], rtol=1e-4,
                                   atol=1e-12)
        np.testing.assert_allclose(plan.apply(V_cells[:, 0], axis=0, normalize=True), P.T @ V_cells[:, 0], rtol=1e-4)
        np.testing.assert_allclose(plan.row_marginal(), T.sum(1), rtol=1e-4)
        np.testing.assert_allclose(plan.column_marginal(), T.sum(0), rtol=1e-4)
        np.testing.assert_allclose(plan.entropy(), -(P * np.log(P)).sum(1), rtol=1e-4)
        top = plan.top_k(3)
    noise = [str(w.message) for w in caught] + distributed_warnings
    assert not noise, noise  # nothing from dask or distributed (e.g. keys resubmitted with another task)
    assert isinstance(top, sp.csr_matrix) and top.shape == T.shape
    assert np.all(np.diff(top.indptr) == 3)
    expected_columns = np.argsort(-P, axis=1)[:, :3]
    np.testing.assert_array_equal(np.sort(top.indices.reshape(-1, 3), axis=1), np.sort(expected_columns, axis=1))
    np.testing.assert_allclose(top.toarray()[np.arange(len(P))[:, None], expected_columns],
                               np.take_along_axis(P, expected_columns, axis=1), rtol=1e-4)


def test_top_spot_is_the_results_spot(problem):
    with open_plan(problem["result"], problem["cells"], problem["spot_data"]) as plan:
        top = plan.top_k(1)
    np.testing.assert_array_equal(top.indices, problem["result"]["spot"].values)
    np.testing.assert_allclose(top.data, problem["result"]["probability"].values, rtol=1e-5)


def test_log_domain_result_gives_the_same_plan(problem):
    result = ssa_dask.align(problem["cells"], problem["spot_data"], n_genes=N_GENES_USED, tol=1e-7, log_domain=True)
    assert result.attrs["log_domain"] == 1
    with open_plan(result, problem["cells"], problem["spot_data"]) as plan:
        np.testing.assert_allclose(plan.column_marginal(), problem["reference"].plan.sum(0), rtol=1e-4)
        np.testing.assert_allclose(plan.apply(problem["sc"], axis=0), problem["reference"].plan.T @ problem["sc"],
                                   rtol=1e-4)


def test_cells_and_spots_left_out_by_drop_empty_have_empty_rows_and_columns(problem):
    sc, spots = problem["sc"].copy(), problem["spots"].copy()
    sc[4] = 0.0
    spots[7] = 0.0
    result = ssa_dask.align(sc, spots, n_genes=N_GENES_USED, tol=1e-7, drop_empty=True)
    keep_cells, keep_spots = np.arange(len(sc)) != 4, np.arange(len(spots)) != 7
    T = ssa_dense(sc[keep_cells][:, :], spots[keep_spots], n_genes=N_GENES_USED, tol=1e-12).plan
    full = np.zeros((len(sc), len(spots)))
    full[np.ix_(keep_cells, keep_spots)] = T
    with open_plan(result, sc, spots) as plan:
        np.testing.assert_allclose(plan.apply(sc, axis=0), full.T @ sc, rtol=1e-4, atol=1e-12)
        np.testing.assert_allclose(plan.row_marginal(), full.sum(1), rtol=1e-4, atol=1e-12)
        entropy = plan.entropy()
        top = plan.top_k(2)
    assert np.isnan(entropy[4]) and np.isfinite(np.delete(entropy, 4)).all()
    assert top[4].nnz == 0 and 7 not in top.indices


def test_inputs_other_than_the_results_are_refused(problem):
    result, cells, spot_data = problem["result"], problem["cells"], problem["spot_data"]
    with pytest.raises(SSAInputError, match="300 cells.*299 cells|299 cells.*300 cells"):
        open_plan(result.isel(cell=slice(0, 299)), cells, spot_data)
    with pytest.raises(SSAInputError, match="spots: 24 spots"):
        open_plan(result, cells, spot_data[:24].copy())
    renamed = spot_data.copy()
    renamed.var_names = [f"other{i}" for i in range(renamed.n_vars)]
    with pytest.raises(SSAInputError, match="genes are missing"):
        open_plan(result, cells, renamed)
    with pytest.raises(SSAInputError, match="cell names differ"):
        open_plan(result, cells[::-1].copy(), spot_data)
    shuffled = spot_data[np.random.default_rng(1).permutation(spot_data.n_obs)].copy()
    with pytest.raises(SSAInputError, match="does not match the result.*row sum"):
        open_plan(result, cells, shuffled)
    with pytest.raises(SSAInputError, match="does not match the result"):
        open_plan(result, cells, spot_data, log1p=True)
    with pytest.raises(SSAInputError, match="lacks"):
        open_plan(result.drop_vars("potential"), cells, spot_data)


def test_arrays_of_the_wrong_length_are_refused(problem):
    with open_plan(problem["result"], problem["cells"], problem["spot_data"], check=False) as plan:
        with pytest.raises(SSAInputError, match="one per cell"):
            plan.apply(np.ones((299, 2)), axis=0)
        with pytest.raises(SSAInputError, match="one row per spot"):
            plan.apply(np.ones((24, 2)), axis=1)
        with pytest.raises(SSAInputError, match="k must be between"):
            plan.top_k(26)


def test_the_check_on_open_reads_a_few_rows_of_large_blocks(problem, monkeypatch):
    import ssa_dask.plan

    monkeypatch.setattr(ssa_dask.plan, "CHECKED_ROWS", 5)
    result, cells, spot_data = problem["result"], problem["cells"], problem["spot_data"]
    with open_plan(result, cells, spot_data, block_rows=100) as plan:
        assert plan.row_chunks == (100, 100, 100)
    shuffled = spot_data[np.random.default_rng(1).permutation(spot_data.n_obs)].copy()
    with pytest.raises(SSAInputError, match="does not match the result"):
        open_plan(result, cells, shuffled, block_rows=100)
