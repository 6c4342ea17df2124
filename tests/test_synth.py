"""Tests of the atlas-scale synthetic data generator (ssa_dask.evaluation.synth) and ``ssa-dask synth``."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from typer.testing import CliRunner

import ssa_dask.cli.scale  # noqa: F401  (registers the command)
from ssa_dask.cli._app import app
from ssa_dask.errors import OutputExistsError, SSAInputError
from ssa_dask.evaluation.synth import (
    CELL_BLOCK,
    SynthModel,
    SynthParams,
    generate_cells,
    synth_anndata,
    write_synth,
)

SMALL = SynthParams(n_cells=2 * CELL_BLOCK + 345, n_genes=300, n_spots=49, density=0.1, seed=3)


@pytest.fixture(scope="module")
def small_mem() -> tuple[ad.AnnData, ad.AnnData]:
    return synth_anndata(SMALL)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    return write_synth(tmp_path_factory.mktemp("synth") / "out", SMALL, chunk_rows=700)


def _same_csr(a: sp.spmatrix, b: sp.spmatrix) -> bool:
    a, b = sp.csr_matrix(a), sp.csr_matrix(b)
    return (
        a.shape == b.shape
        and np.array_equal(a.indptr, b.indptr)
        and np.array_equal(a.indices, b.indices)
        and np.array_equal(a.data, b.data)
    )


def test_round_trip_read_zarr_equals_one_shot(small_mem, small_disk):
    cells, spots = small_mem
    disk_cells = ad.read_zarr(small_disk.cells)
    disk_spots = ad.read_zarr(small_disk.spots)
    assert sp.issparse(disk_cells.X) and disk_cells.X.format == "csr"
    assert _same_csr(disk_cells.X, cells.X)
    assert _same_csr(disk_spots.X, spots.X)
    assert disk_cells.obs.equals(cells.obs)
    assert disk_spots.obs.equals(spots.obs)
    assert list(disk_cells.var_names) == list(disk_spots.var_names) == list(cells.var_names)
    np.testing.assert_array_equal(disk_cells.obsm["spatial"], cells.obs[["x", "y"]].to_numpy())
    assert disk_cells.uns["synth"]["n_cells"] == SMALL.n_cells
    assert json.loads(small_disk.params.read_text())["seed"] == SMALL.seed


def test_on_disk_encoding_is_anndata_csr(small_disk):
    group = zarr.open_group(small_disk.cells, mode="r")
    X = group["X"]
    assert X.attrs["encoding-type"] == "csr_matrix"
    assert tuple(X.attrs["shape"]) == (SMALL.n_cells, SMALL.n_genes)
    assert X["indptr"].dtype == np.int64
    assert X["indptr"].shape == (SMALL.n_cells + 1,)
    assert X["data"].dtype == np.float32
    assert group.attrs["encoding-type"] == "anndata"


def test_rows_do_not_depend_on_the_range_asked():
    model = SynthModel(SMALL)
    whole, obs = generate_cells(model, 0, SMALL.n_cells)
    lo, hi = CELL_BLOCK - 17, 2 * CELL_BLOCK + 5  # cuts two blocks
    part, part_obs = generate_cells(model, lo, hi)
    assert _same_csr(part, whole[lo:hi])
    assert part_obs.equals(obs.iloc[lo:hi])


def test_deterministic_and_seed_dependent():
    a, _ = synth_anndata(SMALL)
    b, _ = synth_anndata(SMALL)
    c, _ = synth_anndata(SynthParams(**{**SMALL.__dict__, "seed": SMALL.seed + 1}))
    assert _same_csr(a.X, b.X)
    assert a.obs.equals(b.obs)
    assert not _same_csr(a.X, c.X)


@pytest.mark.parametrize("density", [0.05, 0.1, 0.3])
def test_density_near_target(density):
    cells, _ = synth_anndata(SynthParams(n_cells=1500, n_genes=400, n_spots=25, density=density, seed=0))
    observed = cells.X.nnz / (cells.n_obs * cells.n_vars)
    assert abs(observed - density) < 0.1 * density
    assert cells.X.data.min() >= 1.0
    assert np.all(np.diff(cells.X.indices[cells.X.indptr[0] : cells.X.indptr[1]]) > 0)


def test_truth_is_consistent_with_layout(small_mem):
    cells, spots = small_mem
    obs = cells.obs
    model = SynthModel(SMALL)
    # true spot = nearest spot centre
    d2 = (obs["x"].to_numpy()[:, None] - spots.obs["x"].to_numpy()) ** 2 + (
        obs["y"].to_numpy()[:, None] - spots.obs["y"].to_numpy()
    ) ** 2
    np.testing.assert_array_equal(d2.argmin(axis=1), obs["true_spot"].to_numpy())
    # domain recorded = domain of the position; type mostly the domain's type
    np.testing.assert_array_equal(model.domain_of(obs[["x", "y"]].to_numpy()), obs["domain"].to_numpy())
    agree = (obs["cell_type"].cat.codes.to_numpy() == model.domain_type[obs["domain"].to_numpy()]).mean()
    assert agree > 1 - SMALL.mix - 0.05
    # spots sum cells_per_spot cells, so they are denser than cells
    assert spots.X.nnz / np.prod(spots.shape) > cells.X.nnz / np.prod(cells.shape)


def test_cell_types_have_distinct_programmes(small_mem):
    cells, _ = small_mem
    X = cells.X.toarray() > 0
    codes = cells.obs["cell_type"].cat.codes.to_numpy()
    model = SynthModel(SMALL)
    t = int(np.bincount(codes).argmax())
    markers = model.marker_of == t
    rate_in = X[codes == t][:, markers].mean()
    rate_out = X[codes != t][:, markers].mean()
    assert rate_in > 2 * rate_out


def test_bad_parameters_raise():
    with pytest.raises(SSAInputError, match="density"):
        SynthParams(n_cells=10, density=0.0)
    with pytest.raises(SSAInputError, match="n_cells"):
        SynthParams(n_cells=0)
    with pytest.raises(SSAInputError, match="row range"):
        generate_cells(SynthModel(SMALL), 5, 5)


def test_existing_output_needs_overwrite(tmp_path):
    params = SynthParams(n_cells=50, n_genes=20, n_spots=4, seed=0)
    write_synth(tmp_path / "o", params)
    with pytest.raises(OutputExistsError):
        write_synth(tmp_path / "o", params)
    write_synth(tmp_path / "o", params, overwrite=True)


def test_cli_synth_writes_readable_stores(tmp_path):
    out = tmp_path / "cli"
    args = [str(out), "--cells", "1200", "--genes", "80", "--spots", "16", "--chunk-rows", "500", "-q"]
    if len(app.registered_commands) + len(app.registered_groups) > 1:  # Typer collapses a one-command app
        args = ["synth", *args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cells = ad.read_zarr(out / "cells.zarr")
    assert cells.shape == (1200, 80)
    expected, _ = synth_anndata(SynthParams(n_cells=1200, n_genes=80, n_spots=16, seed=0))
    assert _same_csr(cells.X, expected.X)
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0


def test_smaller_data_set_is_a_prefix_of_a_larger_one():
    small, small_spots = synth_anndata(SynthParams(n_cells=CELL_BLOCK + 10, n_genes=60, n_spots=9, seed=5))
    large, large_spots = synth_anndata(SynthParams(n_cells=2 * CELL_BLOCK + 10, n_genes=60, n_spots=9, seed=5))
    assert _same_csr(large.X[: small.n_obs], small.X)
    assert large.obs.iloc[: small.n_obs].equals(small.obs)
    assert _same_csr(large_spots.X, small_spots.X)
