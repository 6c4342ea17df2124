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


def test_sparse_input_matches_dense_input(counts_problem):
    sc, spots = counts_problem
    dense = ssa_dask.align(sc, spots, n_genes=30, tol=1e-7)
    sparse = ssa_dask.align(sp.csr_matrix(sc), sp.csr_matrix(spots), n_genes=30, block_rows=64, tol=1e-7)
    np.testing.assert_array_equal(sparse["spot"].values, dense["spot"].values)
    np.testing.assert_allclose(sparse["probability"].values, dense["probability"].values, rtol=1e-4)


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
