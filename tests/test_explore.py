"""Composition, imputation, uncertainty and the held-out-gene check equal the dense NumPy plan's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import ssa_dask
from ssa_dask.errors import SSAInputError
from ssa_dask.explore import composition, heldout_gene_check, impute, uncertainty
from ssa_dask.plan import open_plan
from ssa_dask.reference import pearson_cost, sinkhorn_dense, ssa_dense

from plan_problems import as_anndata, make_problem

N_GENES_USED = 30  # of 40


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    sc, spots, coords, cell_type = make_problem(seed=11)
    cells, spot_data = as_anndata(sc, spots, coords)
    folder = tmp_path_factory.mktemp("explore")
    cells.write_h5ad(folder / "cells.h5ad")
    spot_data.write_h5ad(folder / "spots.h5ad")
    result = ssa_dask.align(cells, spot_data, n_genes=N_GENES_USED, tol=1e-7)
    # the same alignment with the kernel streamed from a kernel store on disk, written and read back
    on_disk = ssa_dask.align(cells, spot_data, n_genes=N_GENES_USED, tol=1e-7, kernel_storage="zarr",
                             kernel_path=str(folder / "scratch"), block_rows=77)
    ssa_dask.write_result(on_disk, str(folder / "result.zarr"))
    T = ssa_dense(sc, spots, n_genes=N_GENES_USED, tol=1e-12).plan
    return {"sc": sc, "coords": coords, "cell_type": cell_type, "cells": cells, "spot_data": spot_data,
            "folder": folder, "result": result, "T": T}


@pytest.fixture(params=["threads-memory", "cluster-h5ad", "zarr-kernel-result-from-disk"])
def plan(request, problem):
    if request.param == "zarr-kernel-result-from-disk":
        folder = problem["folder"]
        opened = open_plan(str(folder / "result.zarr"), str(folder / "cells.h5ad"), str(folder / "spots.h5ad"))
    elif request.param == "cluster-h5ad":
        folder = problem["folder"]
        opened = open_plan(problem["result"], str(folder / "cells.h5ad"), str(folder / "spots.h5ad"),
                           client=request.getfixturevalue("cluster_client"), block_rows=64)
    else:
        opened = open_plan(problem["result"], problem["cells"], problem["spot_data"], block_rows=64)
    with opened:
        yield opened


def test_composition_equals_the_dense_plan(problem, plan):
    T, cell_type = problem["T"], problem["cell_type"]
    P = T / T.sum(1, keepdims=True)
    names = np.array(["T0", "T1", "T2", "T3", "T4"], dtype=object)
    expected = P.T @ (cell_type[:, None] == np.arange(5))
    ds = composition(plan, names[cell_type])
    assert list(ds["category"].values) == list(names)
    assert list(ds["spot"].values) == [f"s{j}" for j in range(T.shape[1])]
    np.testing.assert_allclose(ds["expected_count"].values, expected, rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(ds["fraction"].values, expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(ds["expected_count"].values.sum(), T.shape[0], rtol=1e-6)


def test_composition_matches_labels_by_cell_name_and_skips_missing_ones(problem):
    T, cell_type = problem["T"], problem["cell_type"]
    P = T / T.sum(1, keepdims=True)
    labels = pd.Series(cell_type.astype(float), index=[f"c{i}" for i in range(len(cell_type))])
    labels.iloc[:10] = np.nan
    order = np.random.default_rng(2).permutation(len(labels))
    with open_plan(problem["result"], problem["cells"], problem["spot_data"]) as opened:
        ds = composition(opened, labels.iloc[order])
        with pytest.raises(SSAInputError, match="labels: 5 labels for 300 cells"):
            composition(opened, cell_type[:5])
    labelled = np.arange(len(cell_type)) >= 10
    expected = P[labelled].T @ (cell_type[labelled][:, None] == np.arange(5))
    np.testing.assert_allclose(ds["expected_count"].values, expected, rtol=1e-4, atol=1e-10)


def test_imputation_equals_the_dense_plan_and_gene_batches_agree(problem, plan):
    T, sc = problem["T"], problem["sc"]
    expected = (T.T @ sc) / T.sum(0)[:, None]
    whole = impute(plan, batch_genes=1000)
    batched = impute(plan, batch_genes=7)
    assert whole.dims == ("spot", "gene") and list(whole["gene"].values) == [f"g{i}" for i in range(sc.shape[1])]
    np.testing.assert_allclose(whole.values, expected, rtol=1e-4)
    np.testing.assert_allclose(batched.values, whole.values, rtol=1e-12)
    some = impute(plan, genes=["g39", "g3"], batch_genes=1)
    np.testing.assert_allclose(some.values, expected[:, [39, 3]], rtol=1e-4)


def test_imputation_from_another_matrix_of_the_same_cells(problem):
    T, sc = problem["T"], problem["sc"]
    other = problem["cells"].copy()
    other.layers["log"] = np.log1p(sc)
    with open_plan(problem["result"], problem["cells"], problem["spot_data"]) as opened:
        imputed = impute(opened, other, genes=["g2"], layer="log")
        with pytest.raises(SSAInputError, match="not in the cells"):
            impute(opened, genes=["g1", "nope"])
        with pytest.raises(SSAInputError, match="not the plan's cells"):
            impute(opened, sc[:20])
    np.testing.assert_allclose(imputed.values[:, 0], (T.T @ np.log1p(sc[:, 2])) / T.sum(0), rtol=1e-4)


def test_uncertainty_equals_the_dense_plan(problem, plan):
    T, coords = problem["T"], problem["coords"]
    P = T / T.sum(1, keepdims=True)
    top = P.argmax(1)
    distance = np.linalg.norm(coords[None, :, :] - coords[top][:, None, :], axis=2)
    ds = uncertainty(plan)
    np.testing.assert_array_equal(ds["top_spot"].values, top)
    np.testing.assert_array_equal(ds["top_spot"].values, problem["result"]["spot"].values)
    np.testing.assert_allclose(ds["top_probability"].values, P.max(1), rtol=1e-4)
    np.testing.assert_allclose(ds["entropy"].values, -(P * np.log(P)).sum(1), rtol=1e-4)
    np.testing.assert_allclose(ds["expected_distance"].values, (P * distance).sum(1), rtol=1e-4)


def test_heldout_gene_check_equals_the_dense_computation(problem):
    sc, spots = problem["sc"], problem["spot_data"].X
    held = [3, 17, 30]
    train = [g for g in range(sc.shape[1]) if g not in held]
    check = heldout_gene_check(problem["cells"], problem["spot_data"], [f"g{g}" for g in held], n_genes=100, tol=1e-7)
    # Dense: cost over the training genes, p from every gene of the cells, q from the training genes of the spots.
    cost = pearson_cost(sc[:, train], spots[:, train])
    K = np.exp(-cost / (0.05 * cost.max()))
    p, q = sc.sum(1) / sc.sum(), spots[:, train].sum(1) / spots[:, train].sum()
    a, b, _ = sinkhorn_dense(K, p, q, tol=1e-12)
    T = a[:, None] * K * b[None, :]
    imputed = (T.T @ sc[:, held]) / T.sum(0)[:, None]
    expected = [np.corrcoef(imputed[:, i], spots[:, g])[0, 1] for i, g in enumerate(held)]
    assert check.attrs["n_genes_used"] == len(train)
    np.testing.assert_allclose(check["imputed"].values, imputed, rtol=1e-4)
    np.testing.assert_allclose(check["correlation"].values, expected, rtol=1e-4)
    np.testing.assert_allclose(check.attrs["median_correlation"], np.median(expected), rtol=1e-4)
    with pytest.raises(SSAInputError, match="held-out genes not in the input"):
        heldout_gene_check(problem["cells"], problem["spot_data"], ["g1", "absent"])


def test_passes_in_a_row_on_a_cluster_log_no_scheduler_warning(problem, cluster_client):
    import logging

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    records = Records()
    logger = logging.getLogger("distributed")  # does not propagate to caplog
    logger.addHandler(records)
    try:
        with open_plan(problem["result"], problem["cells"], problem["spot_data"], client=cluster_client) as opened:
            for _ in range(3):  # impute reads the cells twice per pass, the others once: the keys must not clash
                composition(opened, problem["cell_type"])
                impute(opened, batch_genes=20)
                uncertainty(opened)
    finally:
        logger.removeHandler(records)
    assert not records.messages, records.messages
