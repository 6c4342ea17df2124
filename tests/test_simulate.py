"""Binning on a tiny grid, replicate sampling, the synthetic tissue and the written layout."""

from __future__ import annotations

import json

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ssa_dask.errors import OutputExistsError, SSAInputError
from ssa_dask.evaluation.simulate import (
    bin_to_spots,
    sample_replicates,
    synthetic_tissue,
    truth_table,
    write_simulation,
)


def _tiny(sparse: bool = True) -> ad.AnnData:
    # 6 cells on a slide from (0, 0); with side 1.0 they fall in squares
    # (0,0): cells 0, 1;  (1,0): cell 2;  (0,2): cells 3, 4, 5
    xy = np.array([[0.0, 0.0], [0.5, 0.5], [1.2, 0.1], [0.1, 2.1], [0.9, 2.9], [0.2, 2.3]])
    x = np.array(
        [[1, 0, 2], [3, 0, 0], [0, 5, 0], [1, 1, 1], [2, 0, 0], [0, 2, 4]],
        dtype=np.float32,
    )
    obs = pd.DataFrame(
        {"x": xy[:, 0], "y": xy[:, 1], "cell_type": ["a", "a", "b", "b", "b", "a"]},
        index=[f"c{i}" for i in range(6)],
    )
    return ad.AnnData(X=sp.csr_matrix(x) if sparse else x, obs=obs, var=pd.DataFrame(index=["g0", "g1", "g2"]))


def test_bin_to_spots_tiny_grid():
    tiny = _tiny()
    spots, cell_spot = bin_to_spots(tiny, spot_size=1.0)
    assert list(spots.obs_names) == ["spot_0_0", "spot_0_2", "spot_1_0"]
    np.testing.assert_array_equal(cell_spot, [0, 0, 2, 1, 1, 1])
    np.testing.assert_array_equal(spots.obs["n_cells"], [2, 3, 1])
    np.testing.assert_array_equal(spots.obs["grid_i"], [0, 0, 1])
    np.testing.assert_array_equal(spots.obs["grid_j"], [0, 2, 0])
    np.testing.assert_allclose(spots.obs[["x", "y"]].to_numpy(), [[0.25, 0.25], [1.2 / 3, 7.3 / 3], [1.2, 0.1]])
    np.testing.assert_allclose(spots.obsm["spatial"], spots.obs[["x", "y"]].to_numpy())
    assert sp.issparse(spots.X) and spots.X.dtype == np.float32
    np.testing.assert_allclose(spots.X.toarray(), [[2, 0, 1], [1, 1, 5 / 3], [0, 5, 0]], rtol=1e-6)
    assert list(spots.obs["dominant_cell_type"]) == ["a", "b", "b"]
    assert spots.uns["ssa_simulation"]["spot_size"] == 1.0
    assert list(spots.var_names) == ["g0", "g1", "g2"]


def test_bin_to_spots_dense_dask_and_layer_agree():
    sparse_spots, _ = bin_to_spots(_tiny(), spot_size=1.0)
    dense_spots, _ = bin_to_spots(_tiny(sparse=False), spot_size=1.0)
    assert isinstance(dense_spots.X, np.ndarray)
    np.testing.assert_allclose(dense_spots.X, sparse_spots.X.toarray(), rtol=1e-6)

    lazy = _tiny(sparse=False)
    lazy.X = da.from_array(lazy.X, chunks=(2, 3))
    lazy_spots, _ = bin_to_spots(lazy, spot_size=1.0)
    np.testing.assert_allclose(lazy_spots.X, sparse_spots.X.toarray(), rtol=1e-6)
    lazy_rep = sample_replicates(lazy, n_replicates=1, n_cells=4, seed=1)[0]
    eager_rep = sample_replicates(_tiny(sparse=False), n_replicates=1, n_cells=4, seed=1)[0]
    assert isinstance(lazy_rep.X, np.ndarray)
    np.testing.assert_allclose(lazy_rep.X, eager_rep.X)

    layered = _tiny()
    layered.layers["counts"] = layered.X * 2
    layered.X = sp.csr_matrix(layered.shape, dtype=np.float32)
    layer_spots, _ = bin_to_spots(layered, spot_size=1.0, layer="counts", log1p=True)
    np.testing.assert_allclose(layer_spots.X.toarray(), np.log1p(2 * sparse_spots.X.toarray()), rtol=1e-6)


def test_bin_to_spots_target_count():
    tissue = synthetic_tissue(n_cells=2000, n_genes=20, n_types=3, seed=1)
    spots, cell_spot = bin_to_spots(tissue, n_spots=150)
    assert abs(spots.n_obs - 150) <= 3
    assert cell_spot.shape == (2000,) and cell_spot.max() == spots.n_obs - 1
    assert spots.obs["n_cells"].sum() == 2000
    # every cell lies inside its square
    s = spots.uns["ssa_simulation"]["spot_size"]
    origin = np.array(spots.uns["ssa_simulation"]["origin"])
    ij = np.floor((tissue.obs[["x", "y"]].to_numpy() - origin) / s)
    np.testing.assert_array_equal(ij[:, 0], spots.obs["grid_i"].to_numpy()[cell_spot])
    np.testing.assert_array_equal(ij[:, 1], spots.obs["grid_j"].to_numpy()[cell_spot])


def test_bin_to_spots_rejects_bad_arguments():
    with pytest.raises(SSAInputError, match="exactly one"):
        bin_to_spots(_tiny())
    with pytest.raises(SSAInputError, match="exactly one"):
        bin_to_spots(_tiny(), spot_size=1.0, n_spots=3)
    with pytest.raises(SSAInputError, match="positive"):
        bin_to_spots(_tiny(), spot_size=-1.0)
    no_xy = _tiny()
    no_xy.obs = no_xy.obs.drop(columns=["x", "y"])
    with pytest.raises(SSAInputError, match="coordinates"):
        bin_to_spots(no_xy, spot_size=1.0)


def test_sample_replicates_seeded_and_logged():
    tissue = synthetic_tissue(n_cells=500, n_genes=30, n_types=3, seed=2)
    _, cell_spot = bin_to_spots(tissue, spot_size=100.0)
    reps = sample_replicates(tissue, n_replicates=3, fraction=0.2, seed=7, true_spot=cell_spot)
    again = sample_replicates(tissue, n_replicates=3, fraction=0.2, seed=7, true_spot=cell_spot)
    assert [r.n_obs for r in reps] == [100, 100, 100]
    for a, b in zip(reps, again):
        assert list(a.obs_names) == list(b.obs_names)
    assert list(reps[0].obs_names) != list(reps[1].obs_names)
    rep = reps[1]
    pos = tissue.obs_names.get_indexer(rep.obs_names)
    np.testing.assert_allclose(rep.X.toarray(), np.log1p(tissue.X[pos].toarray()), rtol=1e-6)
    np.testing.assert_array_equal(rep.obs["true_spot"], cell_spot[pos])
    np.testing.assert_allclose(rep.obs["x"], tissue.obs["x"].to_numpy()[pos])
    assert list(rep.obs["cell_type"]) == list(tissue.obs["cell_type"].to_numpy()[pos])
    assert (rep.obs["replicate"] == 1).all()

    raw = sample_replicates(tissue, n_replicates=1, n_cells=50, log1p=False, seed=7)[0]
    np.testing.assert_allclose(raw.X.toarray(), tissue.X[tissue.obs_names.get_indexer(raw.obs_names)].toarray())
    assert "true_spot" not in raw.obs


def test_sample_replicates_rejects_bad_sizes():
    tissue = _tiny()
    with pytest.raises(SSAInputError):
        sample_replicates(tissue, fraction=0.5, n_cells=2)
    with pytest.raises(SSAInputError):
        sample_replicates(tissue, fraction=1.5)
    with pytest.raises(SSAInputError):
        sample_replicates(tissue, n_cells=7)
    with pytest.raises(SSAInputError):
        sample_replicates(tissue, true_spot=np.zeros(3))


def test_synthetic_tissue_structure():
    tissue = synthetic_tissue(n_cells=3000, n_genes=100, n_types=4, seed=3)
    assert tissue.shape == (3000, 100)
    assert sp.isspmatrix_csr(tissue.X) and tissue.X.dtype == np.float32
    values = tissue.X.data
    np.testing.assert_array_equal(values, np.round(values))  # counts
    assert set(tissue.obs["cell_type"]) == {f"type_{t}" for t in range(4)}
    # spatial domains: a cell's nearest neighbour mostly shares its type
    xy = tissue.obs[["x", "y"]].to_numpy()
    d = ((xy[:500, None, :] - xy[None, :, :]) ** 2).sum(-1)
    d[np.arange(500), np.arange(500)] = np.inf
    types = tissue.obs["cell_type"].to_numpy()
    assert np.mean(types[d.argmin(axis=1)] == types[:500]) > 0.6
    # library sizes vary and markers separate types
    totals = np.asarray(tissue.X.sum(axis=1)).ravel()
    assert totals.std() / totals.mean() > 0.2
    again = synthetic_tissue(n_cells=3000, n_genes=100, n_types=4, seed=3)
    assert (again.X != tissue.X).nnz == 0


def test_write_simulation_layout(tmp_path):
    tissue = synthetic_tissue(n_cells=300, n_genes=20, n_types=2, seed=4)
    spots, cell_spot = bin_to_spots(tissue, spot_size=200.0)
    reps = sample_replicates(tissue, n_replicates=2, fraction=0.5, true_spot=cell_spot)
    truth = truth_table(tissue, spots, cell_spot)
    assert (truth["true_spot_name"].to_numpy() == spots.obs_names.to_numpy()[cell_spot]).all()
    out = write_simulation(tmp_path / "sim", spots, reps, truth, params={"seed": 0})
    assert (out / "spots.h5ad").exists()
    back = ad.read_h5ad(out / "replicates" / "replicate_001.h5ad")
    assert back.n_obs == reps[1].n_obs
    assert (back.obs["true_spot"].to_numpy() == reps[1].obs["true_spot"].to_numpy()).all()
    meta = json.loads((out / "simulation.json").read_text())
    assert meta["n_spots"] == spots.n_obs and meta["n_replicates"] == 2 and meta["seed"] == 0
    assert pd.read_csv(out / "truth.csv", index_col=0).shape[0] == 300
    with pytest.raises(OutputExistsError):
        write_simulation(tmp_path / "sim", spots, reps, truth)
