"""The full pipeline against the dense reference, across inputs, chunkings, storage and schedulers."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import ssa_dask
from ssa_dask.reference import ssa_dense


def assert_matches_reference(ds, reference, rtol=5e-4):
    np.testing.assert_array_equal(ds["spot"].values, reference.spot)
    np.testing.assert_allclose(ds["probability"].values, reference.probability, rtol=rtol)


@pytest.mark.parametrize("block_rows", [None, 300, 77])
def test_dense_input_matches_reference(counts_problem, block_rows):
    sc, spots = counts_problem
    ds = ssa_dask.align(sc, spots, n_genes=30, block_rows=block_rows, tol=1e-7)
    reference = ssa_dense(sc, spots, n_genes=30, tol=1e-11)
    assert_matches_reference(ds, reference)
    assert ds.attrs["converged"] == 1
    np.testing.assert_allclose(ds.attrs["eps"], reference.eps, rtol=1e-5)
    assert ds.attrs["n_genes_used"] == len(reference.genes)


@pytest.fixture(scope="module")
def sparse_problem() -> tuple[np.ndarray, np.ndarray]:
    """400 cells over 3,000 genes at about 1.3 % non-zeros (each type expresses its own 500 genes), 30 spots."""
    rng = np.random.default_rng(11)
    n_types, n_genes = 6, 3000
    programmes = np.zeros((n_types, n_genes))
    for t in range(n_types):
        programmes[t, t * 500:(t + 1) * 500] = rng.gamma(2.0, 0.04, 500)
    cell_type = rng.integers(0, n_types, 400)
    sc = rng.poisson(programmes[cell_type] * rng.gamma(4.0, 0.25, (400, 1))).astype(np.float64)
    spots = rng.poisson(200 * rng.dirichlet(np.full(n_types, 0.3), 30) @ programmes).astype(np.float64)
    return sc, spots


def test_sparse_input_takes_the_sparse_path_and_matches_dense_input(sparse_problem, monkeypatch):
    import types

    from ssa_dask import cost as cost_module

    sc, spots = sparse_problem
    density = np.count_nonzero(sc) / sc.size
    assert density < cost_module.DENSIFY_ABOVE_DENSITY  # measured: 1.3 % against the 2 % switch
    sparse_blocks = []

    def spy_csr(matrix, *args, **kwargs):  # only the sparse branch of PearsonCost.correlation builds a CSR copy
        sparse_blocks.append(matrix.shape)
        return sp.csr_matrix(matrix, *args, **kwargs)

    monkeypatch.setattr(cost_module, "sp", types.SimpleNamespace(issparse=sp.issparse, csr_matrix=spy_csr))
    sparse = ssa_dask.align(sp.csr_matrix(sc), spots, n_genes=sc.shape[1], block_rows=100, tol=1e-7)
    assert sum(shape[0] for shape in sparse_blocks) >= sc.shape[0]  # every cell went through the sparse branch
    sparse_blocks.clear()
    dense = ssa_dask.align(sc, spots, n_genes=sc.shape[1], block_rows=100, tol=1e-7)
    assert sparse_blocks == []  # dense input never takes it
    reference = ssa_dense(sc, spots, n_genes=sc.shape[1], tol=1e-11)
    assert_matches_reference(sparse, reference)
    np.testing.assert_array_equal(sparse["spot"].values, dense["spot"].values)
    np.testing.assert_allclose(sparse["probability"].values, dense["probability"].values, rtol=1e-4)


def test_plan_from_the_potentials_matches_an_independent_dense_reference(counts_problem):
    """The plan rebuilt from both returned potentials (f, g), not by re-applying the row update,
    against the dense reference; a perturbed column potential fails the same check."""
    sc, spots = counts_problem
    ds = ssa_dask.align(sc, spots, n_genes=30, tol=1e-7)
    reference = ssa_dense(sc, spots, n_genes=30, tol=1e-12)
    eps, f, g = ds.attrs["eps"], ds["potential"].values, ssa_dask.column_potential(ds)

    def plan(column_potential):
        return np.exp((f[:, None] + column_potential[None, :] - reference.cost) / eps)

    p, q = sc.sum(1) / sc.sum(), spots.sum(1) / spots.sum()
    solved = plan(g)
    np.testing.assert_allclose(solved, reference.plan, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(solved.sum(1), p, rtol=1e-4)
    np.testing.assert_allclose(solved.sum(0), q, rtol=1e-4)
    # measured deviation from the reference: 7.5e-6 (float32 cost); a change of g by 1 % of eps on one
    # spot moves that column by 1 %, 100 times the tolerance, and must be caught
    perturbed = g.copy()
    perturbed[3] += 0.01 * eps
    wrong = plan(perturbed)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(wrong, reference.plan, rtol=1e-4, atol=1e-12)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(wrong.sum(0), q, rtol=1e-4)
    # ... whereas re-applying the row update hides it: rows equal p for any potential (the old, vacuous check)
    K = np.exp(-reference.cost / eps)
    b = np.exp(perturbed / eps)
    rows_again = (p / (K @ b))[:, None] * K * b[None, :]
    np.testing.assert_allclose(rows_again.sum(1), p, rtol=1e-12)


def test_single_spot_sinkhorn_is_exact_at_once(kernel_problem):
    """With one spot every row sends its whole mass there: one iteration, zero error, probability 1 from top_k."""
    from ssa_dask import kernel_from_array, sinkhorn
    from ssa_dask.cluster import Executor

    cost, p, _, eps = kernel_problem
    kernel = kernel_from_array(np.exp(-cost[:, :1] / eps), eps=eps, block_rows=50)
    result = sinkhorn(kernel, p, np.ones(1), tol=1e-6)
    assert result.converged and result.n_iter == 1 and result.marginal_error < 1e-6
    spot, probability, f = kernel.top_k(p, result.g, 1, Executor())
    assert (spot == 0).all() and np.allclose(probability, 1.0)
    # f is independent of the dense reference's scaling: a_i K_i0 b_0 = p_i
    np.testing.assert_allclose(np.exp((f + result.g[0] - cost[:, 0]) / eps), p, rtol=1e-6)


def test_drop_empty_cells_equals_aligning_without_them(counts_problem, tmp_path):
    sc, spots = (m.copy() for m in counts_problem)
    empty = [0, 57, 58, 299]  # first, a pair inside a block, last
    sc[empty] = 0.0
    keep = np.setdiff1d(np.arange(len(sc)), empty)
    ds = ssa_dask.align(sp.csr_matrix(sc), spots, n_genes=30, drop_empty=True, block_rows=64, top_k=2, tol=1e-7)
    reference = ssa_dense(sc[keep], spots, n_genes=30, tol=1e-11)
    assert ds.sizes["cell"] == len(sc) and list(ds["cell"].values[:2]) == ["scRNA_0", "scRNA_1"]
    np.testing.assert_array_equal(ds["spot"].values[keep], reference.spot)
    np.testing.assert_allclose(ds["probability"].values[keep], reference.probability, rtol=5e-4)
    np.testing.assert_allclose(ds.attrs["eps"], reference.eps, rtol=1e-5)
    assert not ds["assigned"].values[empty].any() and ds["assigned"].values[keep].all()
    assert (ds["spot"].values[empty] == -1).all() and (ds["top_spot"].values[empty] == -1).all()
    assert (ds["spot_name"].values[empty] == "").all() and np.isnan(ds["probability"].values[empty]).all()
    assert ds.attrs["n_cells_dropped"] == 4 and ds.attrs["n_spots_dropped"] == 0
    # the same problem without empty cells: identical result, everything assigned
    clean = ssa_dask.align(sc[keep], spots, n_genes=30, drop_empty=True, tol=1e-7)
    assert clean["assigned"].values.all() and clean.attrs["n_cells_dropped"] == 0
    np.testing.assert_array_equal(clean["spot"].values, ds["spot"].values[keep])
    # written and read back, and into AnnData as missing values
    ssa_dask.write_result(ds, str(tmp_path / "r.zarr"))
    back = ssa_dask.read_result(str(tmp_path / "r.zarr")).load()
    np.testing.assert_array_equal(back["assigned"].values, ds["assigned"].values)
    cells = ad.AnnData(sc, obs=pd.DataFrame(index=[f"scRNA_{i}" for i in range(len(sc))]))
    ssa_dask.add_to_anndata(cells, ds)
    assert cells.obs["ssa_spot"].isna().to_numpy()[empty].all() and cells.obs["ssa_spot"].notna().sum() == len(keep)
    assert (~cells.obs["ssa_assigned"].to_numpy()[empty]).all()


def test_drop_empty_with_signed_input_corrects_the_gene_statistics(counts_problem):
    """Under uniform marginals a signed row can sum to zero without being all zeros: it is dropped and its
    values are taken out of the gene statistics, so the result is still that of the problem without it."""
    sc, spots = counts_problem
    centred = sc - sc.mean(0)
    centred[[3, 150]] = 0.0
    centred[200] = 0.0
    centred[200, :2] = [2.5, -2.5]  # sums to zero, not empty
    keep = np.setdiff1d(np.arange(len(sc)), [3, 150, 200])
    ds = ssa_dask.align(centred, spots, n_genes=30, marginals="uniform", drop_empty=True, block_rows=64, tol=1e-7)
    reference = ssa_dense(centred[keep], spots, n_genes=30, marginals="uniform", tol=1e-11)
    assert ds.attrs["n_cells_dropped"] == 3
    np.testing.assert_array_equal(ds["spot"].values[keep], reference.spot)
    np.testing.assert_allclose(ds["probability"].values[keep], reference.probability, rtol=5e-4)


def test_drop_empty_spots_keeps_input_spot_indices(counts_problem, caplog):
    sc, spots = (m.copy() for m in counts_problem)
    spots[[2, 10]] = 0.0
    kept = np.setdiff1d(np.arange(len(spots)), [2, 10])
    with caplog.at_level("WARNING", logger="ssa_dask"):
        ds = ssa_dask.align(sc, spots, n_genes=30, drop_empty=True, tol=1e-7)
    assert "drop_empty: 2 of 25 spots" in caplog.text and "'spots_2'" in caplog.text
    reference = ssa_dense(sc, spots[kept], n_genes=30, tol=1e-11)
    np.testing.assert_array_equal(ds["spot"].values, kept[reference.spot])
    np.testing.assert_array_equal(ds["spot_name"].values, np.array([f"spots_{i}" for i in kept[reference.spot]]))
    assert list(ds["spot_id"].values[~ds["spot_kept"].values]) == ["spots_2", "spots_10"] and ssa_dask.column_potential(ds).size == 23
    assert ds["assigned"].values.all()


def test_zarr_kernel_storage_matches_memory(counts_problem, tmp_path):
    sc, spots = counts_problem
    memory = ssa_dask.align(sc, spots, n_genes=30, kernel_storage="memory", tol=1e-7)
    zarr_ds = ssa_dask.align(sc, spots, n_genes=30, kernel_storage="zarr", kernel_path=str(tmp_path), block_rows=77, tol=1e-7)
    assert zarr_ds.attrs["kernel_storage"] == "zarr"
    assert list(tmp_path.iterdir()) == []  # the kernel store is removed after the run
    np.testing.assert_array_equal(zarr_ds["spot"].values, memory["spot"].values)
    np.testing.assert_allclose(zarr_ds["probability"].values, memory["probability"].values, rtol=1e-5)


def test_log_domain_agrees_and_lambda_or_eps(counts_problem):
    sc, spots = counts_problem
    reference = ssa_dense(sc, spots, n_genes=30, tol=1e-11)
    log_ds = ssa_dask.align(sc, spots, n_genes=30, log_domain=True, tol=1e-9)
    assert log_ds.attrs["log_domain"] == 1
    assert_matches_reference(log_ds, reference, rtol=1e-5)
    by_eps = ssa_dask.align(sc, spots, n_genes=30, eps=reference.eps, tol=1e-7)
    assert_matches_reference(by_eps, reference)


def test_small_lambda_chooses_log_domain_and_converges(counts_problem):
    sc, spots = counts_problem
    ds = ssa_dask.align(sc, spots, n_genes=30, lam=0.005, tol=1e-6, max_iter=20_000)
    assert ds.attrs["log_domain"] == 1 and ds.attrs["converged"] == 1
    reference = ssa_dense(sc, spots, n_genes=30, lam=0.005, tol=1e-8, max_iter=100_000)
    np.testing.assert_array_equal(ds["spot"].values, reference.spot)


def test_top_k_is_ordered_and_consistent(counts_problem):
    sc, spots = counts_problem
    ds = ssa_dask.align(sc, spots, n_genes=30, top_k=4, tol=1e-7)
    reference = ssa_dense(sc, spots, n_genes=30, tol=1e-11)
    top = ds["top_probability"].values
    assert top.shape == (sc.shape[0], 4)
    assert np.all(np.diff(top, axis=1) <= 1e-12)
    rows = reference.plan / reference.plan.sum(1, keepdims=True)
    expected = np.sort(rows, axis=1)[:, ::-1][:, :4]
    np.testing.assert_allclose(top, expected, rtol=5e-4)
    np.testing.assert_array_equal(ds["top_spot"].values[:, 0], ds["spot"].values)


def test_anndata_inputs_names_coordinates_and_obs_write_back(counts_problem):
    sc, spots = counts_problem
    genes = [f"g{i}" for i in range(sc.shape[1])]
    cells = ad.AnnData(sc, obs=pd.DataFrame(index=[f"cell{i}" for i in range(len(sc))]), var=pd.DataFrame(index=genes))
    # spots carry extra genes and a shuffled gene order: matched by name
    order = np.random.default_rng(0).permutation(len(genes))
    extra = np.zeros((len(spots), 2))  # genes the cells lack (all-zero so the spot totals stay the same)
    spot_ad = ad.AnnData(np.hstack([spots[:, order], extra]).astype(float),
                         obs=pd.DataFrame({"x": np.arange(len(spots)) * 2.0, "y": np.zeros(len(spots))},
                                          index=[f"s{i}" for i in range(len(spots))]),
                         var=pd.DataFrame(index=[genes[i] for i in order] + ["extra1", "extra2"]))
    ds = ssa_dask.align(cells, spot_ad, n_genes=30, tol=1e-7)
    reference = ssa_dense(sc, spots, n_genes=30, tol=1e-11)
    assert_matches_reference(ds, reference)
    assert list(ds["cell"].values[:2]) == ["cell0", "cell1"]
    np.testing.assert_array_equal(ds["spot_name"].values, np.array([f"s{i}" for i in reference.spot]))
    np.testing.assert_allclose(ds["spot_x"].values, reference.spot * 2.0)
    ssa_dask.add_to_anndata(cells, ds)
    assert (cells.obs["ssa_spot"].astype(str).to_numpy() == ds["spot_name"].values).all()
    assert cells.obsm["ssa_top_spot"].shape == (len(sc), 1)
    assert cells.uns["ssa"]["n_iter"] == ds.attrs["n_iter"]


def test_uniform_marginals_match_reference(counts_problem):
    sc, spots = counts_problem
    ds = ssa_dask.align(sc, spots, n_genes=30, marginals="uniform", tol=1e-7)
    assert_matches_reference(ds, ssa_dense(sc, spots, n_genes=30, marginals="uniform", tol=1e-11))


def test_result_round_trips_through_zarr(counts_problem, tmp_path):
    sc, spots = counts_problem
    ds = ssa_dask.align(sc, spots, n_genes=30, top_k=2, tol=1e-7)
    path = tmp_path / "result.zarr"
    ssa_dask.write_result(ds, str(path))
    back = ssa_dask.read_result(str(path)).load()
    np.testing.assert_array_equal(back["top_spot"].values, ds["top_spot"].values)
    assert back.attrs["n_iter"] == ds.attrs["n_iter"]
    with pytest.raises(ssa_dask.OutputExistsError, match="overwrite"):
        ssa_dask.write_result(ds, str(path))
    ssa_dask.write_result(ds.isel(cell=slice(0, 5)), str(path), overwrite=True)
    assert ssa_dask.read_result(str(path)).sizes["cell"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["result.zarr"]  # no partial or old copies left


def test_multiprocess_local_cluster_gives_the_same_answer(counts_problem):
    distributed = pytest.importorskip("distributed")
    sc, spots = counts_problem
    threads = ssa_dask.align(sp.csr_matrix(sc), spots, n_genes=30, block_rows=100, tol=1e-7)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        on_cluster = ssa_dask.align(sp.csr_matrix(sc), spots, n_genes=30, block_rows=100, tol=1e-7, client=client)
        on_cluster_zarr = ssa_dask.align(sc, spots, n_genes=30, block_rows=100, tol=1e-7, client=client,
                                         kernel_storage="zarr")
    np.testing.assert_array_equal(on_cluster["spot"].values, threads["spot"].values)
    np.testing.assert_allclose(on_cluster["probability"].values, threads["probability"].values, rtol=1e-5)
    np.testing.assert_array_equal(on_cluster_zarr["spot"].values, threads["spot"].values)


def test_default_blocks_align_with_stored_chunks():
    from ssa_dask.align import default_block_rows

    # 5000 genes, 4000 spots: ~6,700 rows by size; stored chunks of 8,192 are split evenly in two
    assert default_block_rows(1_000_000, 4000, 5000, 2, stored_rows=8192) == 4096
    # stored chunks smaller than the target: whole multiples of them
    assert default_block_rows(1_000_000, 4000, 5000, 2, stored_rows=1000) == 6000
    # few cells: one block per thread
    assert default_block_rows(300, 25, 40, 2) == 150


@pytest.mark.parametrize("lam", [0.05, 0.005])
def test_reported_potentials_rebuild_the_reference_plan(counts_problem, lam):
    sc, spots = counts_problem
    ds = ssa_dask.align(sc, spots, n_genes=30, lam=lam, tol=1e-7, max_iter=50_000)
    assert ds.attrs["converged"] == 1
    reference = ssa_dense(sc, spots, n_genes=30, lam=lam, tol=1e-11, max_iter=200_000)
    f, g, eps = ds["potential"].values, ssa_dask.column_potential(ds), ds.attrs["eps"]

    def plan_of(column_potential):  # from the reported potentials alone, no row update re-applied
        return np.exp((f[:, None] + column_potential[None, :] - reference.cost) / eps)

    plan = plan_of(g)
    np.testing.assert_allclose(plan.sum(1), reference.plan.sum(1), rtol=1e-4)
    np.testing.assert_allclose(plan.sum(0), reference.plan.sum(0), rtol=1e-4)
    np.testing.assert_allclose(plan, reference.plan, rtol=1e-3, atol=1e-12)
    wrong = plan_of(g + 0.02 * eps * np.random.default_rng(0).standard_normal(g.shape))
    assert not np.allclose(wrong.sum(0), reference.plan.sum(0), rtol=1e-4)


def test_checkpoint_resume_counts_the_iterations_before_it(counts_problem, tmp_path):
    sc, spots = counts_problem
    whole = ssa_dask.align(sc, spots, n_genes=30, tol=1e-7)
    state = tmp_path / "state.npz"
    with pytest.warns(ssa_dask.ConvergenceWarning):
        ssa_dask.align(sc, spots, n_genes=30, tol=1e-7, max_iter=15, checkpoint=str(state))  # cut off: saved at 10
    assert state.exists()
    resumed = ssa_dask.align(sc, spots, n_genes=30, tol=1e-7, checkpoint=str(state))
    assert resumed.attrs["n_iter"] == whole.attrs["n_iter"] > 15
    assert resumed.attrs["resumed_from_iteration"] == 10
    np.testing.assert_array_equal(resumed["spot"].values, whole["spot"].values)
    assert not state.exists()  # removed once converged


def test_spot_capacities_replace_the_spot_totals(counts_problem):
    """q from given capacities equals POT's Sinkhorn with that q on the same cost."""
    import anndata as ad
    import ot
    import pandas as pd

    from ssa_dask.reference import pearson_cost

    sc, spots = counts_problem
    capacity = np.random.default_rng(5).integers(1, 30, spots.shape[0]).astype(float)
    slide = ad.AnnData(spots, obs=pd.DataFrame({"n_cells": capacity}, index=[f"s{i}" for i in range(spots.shape[0])]),
                       var=pd.DataFrame(index=[f"gene_{g}" for g in range(spots.shape[1])]))
    by_column = ssa_dask.align(sc, slide, n_genes=40, spot_mass="n_cells", tol=1e-8)
    by_array = ssa_dask.align(sc, spots, n_genes=40, spot_mass=capacity, tol=1e-8)
    cost = pearson_cost(sc, spots)
    p, q = sc.sum(1) / sc.sum(), capacity / capacity.sum()
    plan = ot.sinkhorn(p, q, cost, by_column.attrs["eps"], numItermax=100_000, stopThr=1e-12)
    np.testing.assert_array_equal(by_column["spot"].values, plan.argmax(1))
    np.testing.assert_allclose(by_column["probability"].values, plan.max(1) / plan.sum(1), rtol=1e-3)
    np.testing.assert_array_equal(by_array["spot"].values, by_column["spot"].values)
    assert by_column.attrs["spot_mass"] == "n_cells" and by_array.attrs["spot_mass"] == "array"
    default = ssa_dask.align(sc, spots, n_genes=40, tol=1e-8)
    assert (default["spot"].values != by_column["spot"].values).any()  # the capacities matter
    with pytest.raises(ssa_dask.SSAInputError, match="not a column of the spots' obs"):
        ssa_dask.align(sc, slide, n_genes=40, spot_mass="cells")
    with pytest.raises(ssa_dask.SSAInputError, match="not a positive number"):
        ssa_dask.align(sc, spots, n_genes=40, spot_mass=np.where(capacity > 5, capacity, 0.0))
