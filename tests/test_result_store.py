"""The Zarr result as a tidy xarray store: per-spot variables, chunks, JSON attrs, lazy and quiet opening."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import ssa_dask
from ssa_dask import assign
from ssa_dask.reference import ssa_dense


def _spot_anndata(spots: np.ndarray) -> ad.AnnData:
    """Spots with names and coordinates (x = index, y = index squared, so every spot's position differs)."""
    index = np.arange(len(spots), dtype=float)
    obs = pd.DataFrame({"x": index, "y": index**2}, index=[f"s{i}" for i in range(len(spots))])
    return ad.AnnData(spots, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(spots.shape[1])]))


def _cell_anndata(sc: np.ndarray) -> ad.AnnData:
    return ad.AnnData(sc, obs=pd.DataFrame(index=[f"c{i}" for i in range(len(sc))]),
                      var=pd.DataFrame(index=[f"g{i}" for i in range(sc.shape[1])]))


@pytest.fixture
def result(counts_problem) -> xr.Dataset:
    sc, spots = counts_problem
    return ssa_dask.align(_cell_anndata(sc), _spot_anndata(spots), n_genes=30, top_k=3, tol=1e-7)


def test_per_spot_variables_over_spot_id_and_per_cell_names_kept(result, counts_problem):
    sc, spots = counts_problem
    assert result.sizes["spot_id"] == len(spots) and result.sizes["cell"] == len(sc)
    assert list(result["spot_id"].values[:3]) == ["s0", "s1", "s2"]
    # the per-cell readers of the earlier layout still work: ds["spot"] is the assigned spot's index
    for name in ("spot", "spot_name", "probability", "spot_x", "spot_y", "potential", "assigned"):
        assert result[name].dims == ("cell",), name
    for name in ("top_spot", "top_probability"):
        assert result[name].dims == ("cell", "rank"), name
    assert result["column_potential"].dims == ("spot_id",) and result["column_potential"].dtype == np.float64
    assert result["spot_xy"].dims == ("spot_id", "xy")
    np.testing.assert_array_equal(result["spot_xy"].values, np.column_stack([np.arange(25.0), np.arange(25.0) ** 2]))
    # per-spot values looked up by each cell's spot index agree with the per-cell copies
    at_cell = result.isel(spot_id=result["spot"])
    np.testing.assert_array_equal(at_cell["spot_id"].values, result["spot_name"].values)
    np.testing.assert_array_equal(at_cell["spot_xy"].sel(xy="x").values, result["spot_x"].values)
    np.testing.assert_array_equal(at_cell["spot_xy"].sel(xy="y").values, result["spot_y"].values)
    assert result["spot_kept"].values.all()


def test_column_potential_gives_the_plan_with_the_right_marginals(result, counts_problem):
    """The plan rebuilt from f, column_potential(result) and eps has the problem's marginals and
    equals the dense reference; a wrongly ordered g would fail both."""
    sc, spots = counts_problem
    reference = ssa_dense(sc, spots, n_genes=30, tol=1e-12)
    g = ssa_dask.column_potential(result)
    assert g.shape == (len(spots),) and g.dtype == np.float64
    plan = np.exp((result["potential"].values[:, None] + g[None, :] - reference.cost) / result.attrs["eps"])
    np.testing.assert_allclose(plan, reference.plan, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(plan.sum(0), spots.sum(1) / spots.sum(), rtol=1e-4)
    shuffled = np.exp((result["potential"].values[:, None] + g[::-1][None, :] - reference.cost) / result.attrs["eps"])
    assert not np.allclose(shuffled.sum(0), spots.sum(1) / spots.sum(), rtol=1e-2)


def test_round_trip_is_lazy_and_identical(result, tmp_path):
    path = tmp_path / "r.zarr"
    ssa_dask.write_result(result, str(path))
    back = ssa_dask.open_result(str(path))
    assert back["top_spot"].chunks is not None  # dask-backed: nothing read yet
    loaded = back.load()
    assert set(loaded.variables) == set(result.variables)
    for name, var in result.variables.items():
        np.testing.assert_array_equal(np.asarray(loaded[name].values, dtype=var.dtype), var.values, err_msg=name)
        assert loaded[name].dtype.kind == var.dtype.kind or var.dtype.kind == "O", name
    assert loaded.attrs == result.attrs
    np.testing.assert_array_equal(ssa_dask.column_potential(loaded), ssa_dask.column_potential(result))


def test_plain_open_zarr_and_write_raise_no_warning(result, tmp_path):
    path = tmp_path / "r.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ssa_dask.write_result(result, str(path))
        opened = xr.open_zarr(str(path))
        opened.load()
    assert opened.sizes == result.sizes


def test_attrs_are_json_scalars_with_real_booleans(result, tmp_path):
    ssa_dask.write_result(result, str(tmp_path / "r.zarr"))
    attrs = ssa_dask.open_result(str(tmp_path / "r.zarr")).attrs
    for key in ("converged", "log_domain", "kernel_reused"):
        assert type(attrs[key]) is bool, (key, attrs[key])
    assert attrs["converged"] is True
    assert type(attrs["n_iter"]) is int and type(attrs["eps"]) is float
    for key, value in attrs.items():
        assert value is None or isinstance(value, (bool, int, float, str)), f"{key} is not a JSON scalar: {value!r}"
    json.dumps(attrs)
    for key in ("column_potential", "spots_dropped", "genes_missing_in_spots", "genes_constant"):
        assert key not in attrs


def test_cells_and_spots_are_chunked_on_write(result, tmp_path, monkeypatch):
    monkeypatch.setattr(assign, "CELL_CHUNK", 64)
    monkeypatch.setattr(assign, "SPOT_CHUNK", 10)
    ssa_dask.write_result(result, str(tmp_path / "r.zarr"))
    back = ssa_dask.open_result(str(tmp_path / "r.zarr"))
    assert back["spot"].encoding["chunks"] == (64,)
    assert back["top_probability"].encoding["chunks"] == (64, 3)
    assert back["spot"].chunks == ((64, 64, 64, 64, 44),)
    assert back["column_potential"].encoding["chunks"] == (10,)
    assert back["spot_xy"].encoding["chunks"] == (10, 2)
    assert back["cell"].encoding["chunks"] == (64,)


def test_default_chunks_are_100k_cells(tmp_path):
    cells = pd.Index([f"c{i}" for i in range(250_001)])
    ds = assign.assignment_dataset(np.zeros((len(cells), 1), dtype=np.int64), np.ones((len(cells), 1)), cells,
                                   pd.Index(["a", "b"]), None, g=np.zeros(2))
    ssa_dask.write_result(ds, str(tmp_path / "big.zarr"))
    back = ssa_dask.open_result(str(tmp_path / "big.zarr"))
    assert back["spot"].chunks == ((100_000, 100_000, 50_001),)


def test_dropped_spots_stay_on_the_spot_dimension(counts_problem, tmp_path):
    sc, spots = (m.copy() for m in counts_problem)
    spots[[2, 10]] = 0.0
    kept = np.setdiff1d(np.arange(len(spots)), [2, 10])
    ds = ssa_dask.align(_cell_anndata(sc), _spot_anndata(spots), n_genes=30, drop_empty=True, tol=1e-7)
    assert list(ds["spot_id"].values) == [f"s{i}" for i in range(25)]
    assert list(ds["spot_id"].values[~ds["spot_kept"].values]) == ["s2", "s10"]
    assert np.isnan(ds["column_potential"].values[[2, 10]]).all() and np.isnan(ds["spot_xy"].values[[2, 10]]).all()
    np.testing.assert_array_equal(ds["spot_xy"].values[kept, 0], kept.astype(float))
    np.testing.assert_array_equal(ds.isel(spot_id=ds["spot"])["spot_id"].values, ds["spot_name"].values)
    g = ssa_dask.column_potential(ds)
    assert g.shape == (23,) and np.isfinite(g).all()
    # g is over the kept spots, in their order: the plan of the kept problem has its column marginals
    reference = ssa_dense(sc, spots[kept], n_genes=30, tol=1e-12)
    plan = np.exp((ds["potential"].values[:, None] + g[None, :] - reference.cost) / ds.attrs["eps"])
    np.testing.assert_allclose(plan.sum(0), spots[kept].sum(1) / spots.sum(), rtol=1e-4)
    # and it warm-starts a rerun
    again = ssa_dask.align(_cell_anndata(sc), _spot_anndata(spots), n_genes=30, drop_empty=True, tol=1e-7, init_g=g)
    assert again.attrs["n_iter"] <= 2
    ssa_dask.write_result(ds, str(tmp_path / "r.zarr"))
    back = ssa_dask.open_result(str(tmp_path / "r.zarr"))
    np.testing.assert_array_equal(ssa_dask.column_potential(back), g)


def test_column_potential_reads_the_earlier_attrs_layout():
    old = xr.Dataset({"spot": ("cell", np.array([0, 1]))}, attrs={"column_potential": [0.5, -1.25, 2.0], "converged": 1})
    g = ssa_dask.column_potential(old)
    assert g.dtype == np.float64
    np.testing.assert_array_equal(g, [0.5, -1.25, 2.0])
    with pytest.raises(ssa_dask.SSAInputError, match="no column potential"):
        ssa_dask.column_potential(xr.Dataset({"spot": ("cell", np.array([0]))}))


def test_gene_lists_are_coordinates_that_survive_zarr(tmp_path):
    ds = assign.assignment_dataset(np.array([[0], [1]]), np.ones((2, 1)), pd.Index(["c0", "c1"]), pd.Index(["a", "b"]),
                                   None, genes_missing_in_spots=["G1", "G2"], genes_constant=[])
    ssa_dask.write_result(ds, str(tmp_path / "r.zarr"))
    back = ssa_dask.open_result(str(tmp_path / "r.zarr"))
    assert list(back["gene_missing_in_spots"].values) == ["G1", "G2"]
    assert back.sizes["gene_constant"] == 0 and back["gene_constant"].dtype.kind in "TUO"


def test_add_to_anndata_writes_spatial_from_the_assigned_spot(counts_problem, tmp_path):
    sc, spots = (m.copy() for m in counts_problem)
    sc[[0, 5]] = 0.0
    ds = ssa_dask.align(_cell_anndata(sc), _spot_anndata(spots), n_genes=30, drop_empty=True, tol=1e-7)
    ssa_dask.write_result(ds, str(tmp_path / "r.zarr"))
    lazy = ssa_dask.open_result(str(tmp_path / "r.zarr"))
    cells = _cell_anndata(sc)
    ssa_dask.add_to_anndata(cells, lazy)
    xy = cells.obsm["spatial"]
    assert xy.shape == (len(sc), 2) and np.isnan(xy[[0, 5]]).all()
    assigned = ds["assigned"].values
    spot = ds["spot"].values[assigned]
    np.testing.assert_array_equal(xy[assigned], np.column_stack([spot.astype(float), spot.astype(float) ** 2]))
    assert cells.uns["ssa"]["converged"] is True
    cells.write_h5ad(tmp_path / "cells.h5ad")  # the run record is h5ad-writable
    other = _cell_anndata(sc)
    ssa_dask.add_to_anndata(other, ds, spatial_key=None)
    assert "spatial" not in other.obsm
