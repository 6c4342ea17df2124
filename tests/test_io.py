"""Lazy reading of h5ad / AnnData-Zarr / Zarr arrays, ingest, and atomic writes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

import ssa_dask
from ssa_dask.io import write_atomically


@pytest.fixture
def small_adata() -> ad.AnnData:
    rng = np.random.default_rng(0)
    X = sp.random(120, 30, density=0.3, format="csr", random_state=2, dtype=np.float32) * 5
    obs = pd.DataFrame({"x": rng.random(120), "y": rng.random(120)}, index=[f"c{i}" for i in range(120)])
    var = pd.DataFrame({"symbol": [f"S{i}" for i in range(30)]}, index=[f"ENSG{i}" for i in range(30)])
    adata = ad.AnnData(X, obs=obs, var=var)
    adata.layers["counts"] = X * 2
    return adata


def test_h5ad_is_read_lazily_with_layer_gene_key_and_coordinates(tmp_path, small_adata):
    path = tmp_path / "a.h5ad"
    small_adata.write_h5ad(path)
    matrix = ssa_dask.read_expression(str(path), layer="counts", gene_key="symbol", chunk_rows=50)
    assert matrix.is_sparse and matrix.X.chunks[0] == (50, 50, 20)
    assert list(matrix.genes[:2]) == ["S0", "S1"]
    np.testing.assert_allclose(matrix.X.compute().toarray(), small_adata.layers["counts"].toarray())
    np.testing.assert_allclose(matrix.coords, small_adata.obs[["x", "y"]].to_numpy())


def test_ingest_streams_h5ad_into_row_chunked_zarr(tmp_path, small_adata):
    source = tmp_path / "a.h5ad"
    small_adata.write_h5ad(source)
    target = ssa_dask.ingest(source, tmp_path / "a.zarr", chunk_rows=40)
    back = ad.read_zarr(target)
    np.testing.assert_allclose(back.X.toarray(), small_adata.X.toarray())
    assert list(back.obs_names) == list(small_adata.obs_names)
    lazy = ssa_dask.read_expression(str(target))
    assert lazy.X.chunks[0] == (40, 40, 40)
    np.testing.assert_allclose(lazy.coords, small_adata.obs[["x", "y"]].to_numpy())
    with pytest.raises(ssa_dask.OutputExistsError):
        ssa_dask.ingest(source, target)


def test_ingest_of_a_real_dataset_keeps_values(tmp_path, shared_dataset):
    path = shared_dataset("xenium_breast_scider")
    target = ssa_dask.ingest(path, tmp_path / "xenium.zarr", chunk_rows=4096)
    original = ad.read_h5ad(path)
    lazy = ssa_dask.read_expression(str(target))
    assert lazy.shape == original.shape
    np.testing.assert_array_equal(lazy.X.compute().toarray(), original.X.toarray())


def test_plain_zarr_array_with_gene_names(tmp_path):
    values = np.arange(60, dtype=np.float32).reshape(12, 5)
    array = zarr.create_array(str(tmp_path / "m.zarr"), shape=values.shape, chunks=(5, 5), dtype="float32")
    array[:] = values
    array.attrs["genes"] = list("abcde")
    matrix = ssa_dask.read_expression(str(tmp_path / "m.zarr"))
    assert list(matrix.genes) == list("abcde") and matrix.X.chunks[0] == (5, 5, 2)
    np.testing.assert_array_equal(matrix.X.compute(), values)
    del array.attrs["genes"]
    with pytest.raises(ssa_dask.SSAInputError, match="no gene names"):
        ssa_dask.read_expression(str(tmp_path / "m.zarr"))


def test_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    target = tmp_path / "out.zarr"

    def broken(tmp):
        tmp.mkdir()
        (tmp / "half").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(target, broken)
    assert list(tmp_path.iterdir()) == []
    write_atomically(target, lambda tmp: tmp.mkdir())
    with pytest.raises(RuntimeError):
        write_atomically(target, broken, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]
