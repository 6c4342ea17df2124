"""tl.align and write_plan_summary write the dense plan's values under documented keys; pl draws them."""

from __future__ import annotations

import warnings

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import xarray as xr

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import ssa_dask  # noqa: E402
from ssa_dask import pl, tl  # noqa: E402
from ssa_dask.errors import OutputExistsError, SSAInputError  # noqa: E402
from ssa_dask.reference import ssa_dense  # noqa: E402
from ssa_dask.summary import plan_summary, read_plan_summary, top_k_matrix, write_plan_summary  # noqa: E402

N_GENES_USED = 30  # of 40
TYPES = np.array(["T/a", "T/b", "T/c", "T/d", "T/e"], dtype=object)  # "/" as in real cell-type names
K = 3


def make_anndata(seed: int = 5, n_cells: int = 240, n_spots: int = 20, n_genes: int = 40):
    """Poisson counts with cell-type structure; spots with coordinates; cells with a cell type."""
    rng = np.random.default_rng(seed)
    programmes = rng.gamma(0.6, 3.0, size=(5, n_genes))
    cell_type = rng.integers(0, 5, size=n_cells)
    sc = rng.poisson(programmes[cell_type] * rng.gamma(4.0, 0.5, size=(n_cells, 1))).astype(np.float64)
    spots = rng.poisson(20 * rng.dirichlet(np.full(5, 0.3), size=n_spots) @ programmes).astype(np.float64)
    coords = rng.random((n_spots, 2)) * 10
    genes = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    cells = ad.AnnData(sp.csr_matrix(sc), obs=pd.DataFrame({"cell_type": pd.Categorical(TYPES[cell_type])},
                                                         index=[f"c{i}" for i in range(n_cells)]), var=genes)
    spot_obs = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1]}, index=[f"s{j}" for j in range(n_spots)])
    return cells, ad.AnnData(spots, obs=spot_obs, var=genes.copy())


@pytest.fixture(scope="module")
def dense():
    """The dense NumPy plan of the problem and what every test compares with."""
    cells, spots = make_anndata()
    sc = cells.X.toarray()
    T = ssa_dense(sc, spots.X, n_genes=N_GENES_USED, tol=1e-12).plan
    P = T / T.sum(1, keepdims=True)
    codes = pd.Categorical(cells.obs["cell_type"]).codes
    counts = P.T @ (codes[:, None] == np.arange(5))
    top = P.argmax(1)
    coords = spots.obs[["x", "y"]].to_numpy()
    distance = np.linalg.norm(coords[None, :, :] - coords[top][:, None, :], axis=2)
    top_k = np.zeros_like(P)
    best = np.argsort(-P, axis=1)[:, :K]
    np.put_along_axis(top_k, best, np.take_along_axis(P, best, axis=1), axis=1)
    return {"T": T, "P": P, "top": top, "coords": coords, "counts": counts, "sc": sc, "top_k": top_k,
            "entropy": -(P * np.log(P)).sum(1), "expected_distance": (P * distance).sum(1),
            "imputed": (T.T @ sc[:, [4, 9]]) / T.sum(0)[:, None]}


@pytest.fixture(scope="module")
def aligned():
    """``tl.align`` on fresh AnnData objects: (cells, spots, result)."""
    cells, spots = make_anndata()
    result = tl.align(cells, spots, labels_key="cell_type", impute_genes=["g4", "g9"], top_k=K,
                      n_genes=N_GENES_USED, tol=1e-7)
    return cells, spots, result


@pytest.fixture(scope="module")
def summary():
    cells, spots = make_anndata()
    result = ssa_dask.align(cells, spots, n_genes=N_GENES_USED, tol=1e-7)
    with ssa_dask.open_plan(result, cells, spots) as plan:
        return plan_summary(plan, labels=cells.obs["cell_type"], genes=["g4", "g9"], top_k=K)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------------- tl.align


def test_tl_align_writes_the_dense_plan_into_the_cells(aligned, dense):
    cells, spots, result = aligned
    obs = cells.obs
    assert isinstance(result, xr.Dataset) and result.sizes["rank"] == K
    np.testing.assert_array_equal(obs["ssa_spot"].astype(str).to_numpy(), spots.obs_names[dense["top"]])
    np.testing.assert_array_equal(obs["ssa_spot"].astype(str).to_numpy(), result["spot_name"].values.astype(str))
    np.testing.assert_allclose(obs["ssa_top_probability"], dense["P"].max(1), rtol=1e-4)
    np.testing.assert_allclose(obs["ssa_top_probability"], result["probability"].values, rtol=1e-5)
    np.testing.assert_allclose(obs["ssa_entropy"], dense["entropy"], rtol=1e-4)
    np.testing.assert_allclose(obs["ssa_expected_distance"], dense["expected_distance"], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(cells.obsm["spatial"], dense["coords"][dense["top"]])
    np.testing.assert_array_equal(cells.obsm["ssa_spatial"], cells.obsm["spatial"])
    top_k = cells.obsm["ssa_top_k"]
    assert sp.issparse(top_k) and top_k.shape == (cells.n_obs, spots.n_obs)
    assert np.all(np.diff(top_k.indptr) == K)
    np.testing.assert_allclose(top_k.toarray(), dense["top_k"], rtol=1e-4, atol=1e-12)
    np.testing.assert_array_equal(cells.uns["ssa_top_k_spots"], spots.obs_names)
    assert cells.uns["ssa"]["eps"] == result.attrs["eps"]
    assert list(cells.uns["ssa"]["genes_used"]) == list(result["gene"].values)


def test_tl_align_writes_composition_and_imputed_genes_into_the_spots(aligned, dense):
    cells, spots, result = aligned
    np.testing.assert_array_equal(spots.uns["ssa_categories"], TYPES)
    np.testing.assert_allclose(spots.obsm["ssa_expected_count"], dense["counts"], rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(spots.obsm["ssa_composition"], dense["counts"] / dense["counts"].sum(1, keepdims=True),
                               rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(spots.obs["ssa_expected_cells"], dense["P"].sum(0), rtol=1e-4)
    with ssa_dask.open_plan(result, cells, spots) as plan:
        expected = ssa_dask.composition(plan, cells.obs["cell_type"])
    np.testing.assert_allclose(spots.obsm["ssa_composition"], expected["fraction"].values, rtol=1e-12)
    np.testing.assert_array_equal(spots.uns["ssa_imputed_genes"], ["g4", "g9"])
    np.testing.assert_allclose(spots.obsm["ssa_imputed"], dense["imputed"], rtol=1e-4)
    layer = spots.layers["ssa_imputed"]
    np.testing.assert_array_equal(layer[:, [4, 9]], spots.obsm["ssa_imputed"])
    assert np.isnan(np.delete(layer, [4, 9], axis=1)).all()


def test_tl_align_logs_what_it_wrote(caplog):
    cells, spots = make_anndata(n_cells=60, n_spots=8)
    with caplog.at_level("INFO", logger="ssa_dask"):
        tl.align(cells, spots, key_added="mine", n_genes=N_GENES_USED)
    text = caplog.text
    for key in ("obs['mine_spot']", "obsm['spatial']", "obsm['mine_top_k']", "uns['mine']"):
        assert key in text
    assert "spots: added nothing" in text
    assert "mine_spot" in cells.obs and "ssa_spot" not in cells.obs


def test_tl_align_matches_cells_by_name_when_the_obs_are_shuffled(aligned):
    cells, spots, _ = aligned
    shuffled, shuffled_spots = make_anndata()
    order = np.random.default_rng(1).permutation(shuffled.n_obs)
    shuffled = shuffled[order].copy()
    tl.align(shuffled, shuffled_spots, labels_key="cell_type", top_k=K, n_genes=N_GENES_USED, tol=1e-7)
    back = shuffled[cells.obs_names]
    np.testing.assert_array_equal(back.obs["ssa_spot"].astype(str), cells.obs["ssa_spot"].astype(str))
    np.testing.assert_allclose(back.obs["ssa_entropy"], cells.obs["ssa_entropy"], rtol=1e-4)
    np.testing.assert_allclose(back.obsm["ssa_top_k"].toarray(), cells.obsm["ssa_top_k"].toarray(), rtol=1e-4,
                               atol=1e-12)
    np.testing.assert_allclose(shuffled_spots.obsm["ssa_composition"], spots.obsm["ssa_composition"], rtol=1e-4,
                               atol=1e-10)


def test_tl_align_refuses_unknown_labels_and_genes_before_aligning():
    cells, spots = make_anndata(n_cells=60, n_spots=8)
    with pytest.raises(SSAInputError, match="labels_key 'kind' is not an obs column"):
        tl.align(cells, spots, labels_key="kind")
    with pytest.raises(SSAInputError, match=r"genes to impute not in the cells: \['nope'\]"):
        tl.align(cells, spots, impute_genes=["g1", "nope"])
    assert "ssa_spot" not in cells.obs and "ssa" not in cells.uns


# ---------------------------------------------------------------------- write_plan_summary


def test_write_plan_summary_matches_cells_by_name_not_order(summary):
    cells, spots = make_anndata()
    write_plan_summary(summary, adata_sc=cells, adata_sp=spots)
    shuffled, shuffled_spots = make_anndata()
    cell_order = np.random.default_rng(3).permutation(shuffled.n_obs)
    spot_order = np.random.default_rng(4).permutation(shuffled_spots.n_obs)
    shuffled, shuffled_spots = shuffled[cell_order].copy(), shuffled_spots[spot_order].copy()
    subset = shuffled[:50].copy()  # a subset of the plan's cells is fine too
    write_plan_summary(summary, adata_sc=shuffled, adata_sp=shuffled_spots)
    write_plan_summary(summary, adata_sc=subset)
    for target in (shuffled, subset):
        names = target.obs_names
        for key in ("ssa_spot", "ssa_top_probability", "ssa_entropy", "ssa_expected_distance"):
            pd.testing.assert_series_equal(target.obs[key], cells.obs.loc[names, key], check_categorical=False)
        np.testing.assert_array_equal(target.obsm["spatial"], cells[names].obsm["spatial"])
        assert (target.obsm["ssa_top_k"] != cells[names].obsm["ssa_top_k"]).nnz == 0
    np.testing.assert_array_equal(shuffled_spots.obsm["ssa_composition"], spots.obsm["ssa_composition"][spot_order])
    np.testing.assert_array_equal(shuffled_spots.obsm["ssa_imputed"], spots.obsm["ssa_imputed"][spot_order])


def test_write_plan_summary_refuses_unknown_names_and_writes_nothing(summary, tmp_path):
    cells, spots = make_anndata()
    strangers = cells.copy()
    strangers.obs_names = [f"x{i}" if i % 7 == 0 else name for i, name in enumerate(cells.obs_names)]
    with pytest.raises(SSAInputError, match=r"adata_sc: 35 of 240 cells are not in the plan \(e.g. \['x0', 'x7'"):
        write_plan_summary(summary, tmp_path / "s.zarr", adata_sc=strangers, adata_sp=spots)
    other_spots = spots.copy()
    other_spots.obs_names = [f"{name}_b" for name in spots.obs_names]
    with pytest.raises(SSAInputError, match="adata_sp: 20 of 20 spots are not in the plan"):
        write_plan_summary(summary, tmp_path / "s.zarr", adata_sc=cells, adata_sp=other_spots)
    assert not (tmp_path / "s.zarr").exists()
    assert "ssa_spot" not in cells.obs and "ssa_composition" not in spots.obsm
    twice = cells[[0, 0, 1]]
    with pytest.raises(SSAInputError, match="repeated obs_names"):
        write_plan_summary(summary, adata_sc=twice)
    with pytest.raises(SSAInputError, match="need a plan"):
        write_plan_summary(summary, top_k=2)


def test_plan_summary_equals_the_dense_plan(summary, dense):
    np.testing.assert_array_equal(summary["spot_index"].values, dense["top"])
    np.testing.assert_allclose(top_k_matrix(summary).toarray(), dense["top_k"], rtol=1e-4, atol=1e-12)
    weights = summary["top_k_probability"].values
    assert np.all(np.diff(weights, axis=1) <= 0)  # largest first
    np.testing.assert_allclose(summary["expected_count"].values, dense["counts"], rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(summary["imputed"].values, dense["imputed"], rtol=1e-4)
    np.testing.assert_allclose(summary["assigned_position"].values, dense["coords"][dense["top"]])
    with pytest.raises(SSAInputError, match="top_k must be between 1 and the number of spots"):
        cells, spots = make_anndata(n_cells=60, n_spots=8)
        result = ssa_dask.align(cells, spots, n_genes=N_GENES_USED)
        with ssa_dask.open_plan(result, cells, spots) as plan:
            plan_summary(plan, top_k=9)


def test_write_plan_summary_round_trips_through_zarr(summary, tmp_path):
    path = tmp_path / "summary.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_plan_summary(summary, path)
        stored = read_plan_summary(path)
    assert isinstance(stored["entropy"].data, __import__("dask").array.Array)  # lazy
    stored = stored.load()
    assert set(stored.data_vars) == set(summary.data_vars)
    for name in summary.variables:
        values, expected = stored[name].values, summary[name].values
        if expected.dtype == object:  # strings come back as NumPy StringDType from Zarr
            np.testing.assert_array_equal(values.astype(object), expected)
        else:
            np.testing.assert_array_equal(values, expected)
    assert (top_k_matrix(stored) != top_k_matrix(summary)).nnz == 0
    assert stored.attrs["top_k"] == K
    from_store, from_memory = make_anndata(), make_anndata()
    write_plan_summary(stored, adata_sc=from_store[0], adata_sp=from_store[1])
    write_plan_summary(summary, adata_sc=from_memory[0], adata_sp=from_memory[1])
    pd.testing.assert_frame_equal(from_store[0].obs, from_memory[0].obs)
    np.testing.assert_array_equal(from_store[1].obsm["ssa_composition"], from_memory[1].obsm["ssa_composition"])
    np.testing.assert_array_equal(from_store[1].uns["ssa_categories"], TYPES)
    with pytest.raises(OutputExistsError):
        write_plan_summary(summary, path)
    write_plan_summary(summary, path, overwrite=True)


def test_write_plan_summary_round_trips_through_h5ad(summary, tmp_path):
    cells, spots = make_anndata()
    write_plan_summary(summary, adata_sc=cells, adata_sp=spots)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    spots.write_h5ad(tmp_path / "spots.h5ad")
    cells_back, spots_back = ad.read_h5ad(tmp_path / "cells.h5ad"), ad.read_h5ad(tmp_path / "spots.h5ad")
    pd.testing.assert_frame_equal(cells_back.obs, cells.obs)
    for key in ("spatial", "ssa_spatial"):
        np.testing.assert_array_equal(cells_back.obsm[key], cells.obsm[key])
    assert sp.issparse(cells_back.obsm["ssa_top_k"])
    assert (cells_back.obsm["ssa_top_k"] != cells.obsm["ssa_top_k"]).nnz == 0
    np.testing.assert_array_equal(cells_back.uns["ssa_top_k_spots"], spots.obs_names)
    for key in ("ssa_composition", "ssa_expected_count", "ssa_imputed"):
        np.testing.assert_array_equal(spots_back.obsm[key], spots.obsm[key])
    np.testing.assert_array_equal(spots_back.uns["ssa_categories"], TYPES)
    np.testing.assert_array_equal(spots_back.layers["ssa_imputed"], spots.layers["ssa_imputed"])


# ---------------------------------------------------------------------- pl


def test_plots_return_axes_and_draw_the_values(aligned):
    cells, spots, _ = aligned
    ax = pl.assignments(cells, "cell_type", show=False)
    assert isinstance(ax, matplotlib.axes.Axes)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(TYPES)
    placed = ax.collections[0].get_offsets()
    assert placed.shape == (cells.n_obs, 2)
    assert pl.assignments(cells, "ssa_entropy", jitter=0) is not None
    np.testing.assert_allclose(pl.assignments(cells, jitter=0).collections[0].get_offsets(), cells.obsm["ssa_spatial"])

    fractions = spots.obsm["ssa_composition"]
    for kind in ("pie", "bar"):
        ax = pl.composition(spots, kind=kind)
        assert len(ax.collections[0].get_paths()) == int((fractions >= pl.SMALLEST_DRAWN_FRACTION).sum())
    ax = pl.composition(spots, categories=["T/a"])
    assert len(ax.collections[0].get_paths()) == int((fractions[:, 0] >= pl.SMALLEST_DRAWN_FRACTION).sum())

    measured, imputed = pl.imputed_vs_measured(spots, "g4")
    r = np.corrcoef(spots.X[:, 4], spots.obsm["ssa_imputed"][:, 0])[0, 1]
    assert imputed.get_title() == f"g4: imputed (r = {r:.2f})" and measured.get_title() == "g4: measured"
    np.testing.assert_allclose(measured.collections[0].get_array(), spots.X[:, 4])
    sparse_spots = spots.copy()
    sparse_spots.X = sp.csr_matrix(spots.X)
    np.testing.assert_allclose(pl.imputed_vs_measured(sparse_spots, "g4")[0].collections[0].get_array(), spots.X[:, 4])

    ax = pl.uncertainty(cells, "top_probability")
    per_spot = cells.obs.groupby("ssa_spot", observed=True)["ssa_top_probability"].mean()
    assert len(ax.collections[0].get_array()) == per_spot.size
    np.testing.assert_allclose(np.sort(ax.collections[0].get_array()), np.sort(per_spot.to_numpy()))


def test_imputed_vs_measured_takes_a_heldout_check_matched_by_spot_name(aligned):
    cells, spots, _ = aligned
    check = ssa_dask.heldout_gene_check(cells, spots, ["g4", "g9"], n_genes=N_GENES_USED)
    reversed_check = check.isel(spot=slice(None, None, -1))
    axes = pl.imputed_vs_measured(spots, "g9", imputed=reversed_check["imputed"].sel(gene="g9"),
                                  measured=reversed_check["measured"].sel(gene="g9"))
    assert axes[1].get_title() == f"g9: imputed (r = {float(check['correlation'].sel(gene='g9')):.2f})"
    np.testing.assert_allclose(axes[0].collections[0].get_array(), spots.X[:, 9])
    ax = pl.heldout_correlation(check)
    assert len(ax.patches) == 2
    assert ax.get_legend().get_texts()[0].get_text() == f"median {check.attrs['median_correlation']:.2f}"


def test_plots_name_the_missing_keys():
    cells, spots = make_anndata(n_cells=60, n_spots=8)
    with pytest.raises(SSAInputError, match=r"no obsm\['ssa_spatial'\]; run ssa_dask.tl.align"):
        pl.assignments(cells, "cell_type")
    with pytest.raises(SSAInputError, match=r"no obsm\['ssa_composition'\]"):
        pl.composition(spots)
    with pytest.raises(SSAInputError, match="kind must be 'pie' or 'bar'"):
        pl.composition(spots, kind="donut")
    with pytest.raises(SSAInputError, match="value must be"):
        pl.uncertainty(cells, "doubt")


def test_cells_and_spots_left_out_by_drop_empty_get_missing_values(tmp_path):
    cells, spots = make_anndata(n_cells=60, n_spots=8)
    X = cells.X.tolil()
    X[3, :] = 0
    cells.X = X.tocsr()
    spots.X[5, :] = 0
    tl.align(cells, spots, labels_key="cell_type", impute_genes=["g4"], top_k=2, n_genes=N_GENES_USED, drop_empty=True)
    obs = cells.obs
    assert pd.isna(obs["ssa_spot"].iloc[3]) and obs["ssa_spot"].drop(index="c3").notna().all()
    assert np.isnan(obs["ssa_entropy"].iloc[3]) and np.isfinite(obs["ssa_entropy"].drop(index="c3")).all()
    assert np.isnan(cells.obsm["spatial"][3]).all() and np.isfinite(np.delete(cells.obsm["spatial"], 3, 0)).all()
    row_counts = np.diff(cells.obsm["ssa_top_k"].indptr)
    assert row_counts[3] == 0 and np.all(np.delete(row_counts, 3) == 2)
    assert cells.obsm["ssa_top_k"][:, 5].nnz == 0 and not (obs["ssa_spot"] == "s5").any()
    assert np.isnan(spots.obsm["ssa_composition"][5]).all() and spots.obsm["ssa_expected_count"][5].sum() == 0
    imputed = spots.obsm["ssa_imputed"]
    assert np.isnan(imputed[5]).all() and np.isfinite(np.delete(imputed, 5, 0)).all()
    cells.write_h5ad(tmp_path / "cells.h5ad")
    assert pd.isna(ad.read_h5ad(tmp_path / "cells.h5ad").obs["ssa_spot"].iloc[3])
    assert pl.assignments(cells, "cell_type").collections[0].get_offsets().shape == (59, 2)
    assert pl.composition(spots) is not None and pl.uncertainty(cells) is not None
