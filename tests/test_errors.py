"""Bad input gives a clear ssa_dask error naming the problem, and nothing is written."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

import ssa_dask
from ssa_dask import SSAInputError
from ssa_dask.cli import app


def test_no_shared_genes(counts_problem):
    sc, spots = counts_problem
    genes = [f"g{i}" for i in range(sc.shape[1])]
    with pytest.raises(SSAInputError, match="share no gene names") as info:
        ssa_dask.align(ssa_dask.read_expression(sc, genes=genes), ssa_dask.read_expression(spots, genes=[g + "_x" for g in genes]))
    assert "case" not in str(info.value)


def test_gene_names_differing_only_in_case_get_a_hint(counts_problem):
    sc, spots = counts_problem
    genes = [f"Actb{i}" for i in range(sc.shape[1])]
    with pytest.raises(SSAInputError, match="share no gene names.*40 gene names match when case is ignored "
                                            "\\(e.g. 'Actb0' vs 'ACTB0'\\)"):
        ssa_dask.align(ssa_dask.read_expression(sc, genes=genes), ssa_dask.read_expression(spots, genes=[g.upper() for g in genes]))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["sc", "spots"])
def test_non_finite_values(counts_problem, bad, where):
    sc, spots = (m.copy() for m in counts_problem)
    (sc if where == "sc" else spots)[2, 3] = bad
    role = "scRNA" if where == "sc" else "spots"
    with pytest.raises(SSAInputError, match=f"{role}: 1 NaN or infinite"):
        ssa_dask.align(sc, spots)


def test_non_finite_in_sparse_input(counts_problem):
    sc, spots = counts_problem
    sparse = sp.csr_matrix(sc)
    sparse.data[5] = np.nan
    with pytest.raises(SSAInputError, match="NaN or infinite"):
        ssa_dask.align(sparse, spots)


def test_negative_values(counts_problem):
    sc, spots = counts_problem
    with pytest.raises(SSAInputError, match="negative expression values"):
        ssa_dask.align(sc - 1.0, spots)


@pytest.mark.parametrize("where", ["sc", "spots"])
def test_all_zero_rows(counts_problem, where):
    sc, spots = (m.copy() for m in counts_problem)
    (sc if where == "sc" else spots)[4] = 0.0
    with pytest.raises(SSAInputError, match="zero total expression.*drop_empty=True \\(CLI: --drop-empty\\)"):
        ssa_dask.align(sc, spots)


def test_only_empty_cells_left_after_drop_is_an_error(counts_problem):
    sc, spots = counts_problem
    sc = np.zeros_like(sc)
    sc[0] = 1.0
    with pytest.raises(SSAInputError, match="scRNA: only 1 cell after dropping 299 empty cell\\(s\\)"):
        ssa_dask.align(sc, spots, drop_empty=True)


@pytest.mark.parametrize(("cells", "n_spots", "message"), [
    (0, 25, "scRNA: no cells \\(0 rows\\): nothing to align"),
    (1, 25, "scRNA: only 1 cell; SSA z-scores every gene over the cells, which needs at least 2 cells"),
    (300, 1, "spots: only 1 spot; .*at least 2 spots \\(and with one spot every cell would map to it\\)"),
    (300, 0, "spots: no spots \\(0 rows\\)"),
])
def test_too_few_cells_or_spots_get_their_own_message(counts_problem, cells, n_spots, message):
    sc, spots = counts_problem
    with pytest.raises(SSAInputError, match=message):
        ssa_dask.align(sc[:cells], spots[:n_spots])


def test_fewer_than_three_genes_is_an_error(counts_problem):
    sc, spots = counts_problem
    with pytest.raises(SSAInputError, match="only 2 usable gene\\(s\\) remain .*n_genes=2.*at least 3"):
        ssa_dask.align(sc, spots, n_genes=2)
    assert ssa_dask.align(sc, spots, n_genes=3).attrs["n_genes_used"] == 3


def test_one_cell_holding_most_of_the_mass_is_warned(counts_problem, caplog):
    from ssa_dask.align import MASS_WARN_OVER_MEDIAN

    sc, spots = (m.copy() for m in counts_problem)
    with caplog.at_level("WARNING", logger="ssa_dask"):
        ssa_dask.align(sc, spots, n_genes=30)
    assert "median row mass" not in caplog.text  # the fixture's spread (max/median 4.2x) stays quiet
    totals = sc.sum(1)
    assert totals.max() / np.median(totals) < MASS_WARN_OVER_MEDIAN
    sc[7, 3] = 1e30
    caplog.clear()
    with caplog.at_level("WARNING", logger="ssa_dask"):
        ssa_dask.align(sc, spots, n_genes=30, max_iter=50)
    assert "scRNA: row 7 (scRNA_7) holds" in caplog.text
    assert "times the median row mass (100.0% of the total; warning above 100x)" in caplog.text


def test_zero_variance_genes_are_dropped_with_a_warning(counts_problem, caplog):
    sc, spots = (m.copy() for m in counts_problem)
    sc[:, 0] = 3.0  # constant in the cells
    spots[:, 1] = 7.0  # constant in the spots
    with caplog.at_level("WARNING", logger="ssa_dask"):
        ds = ssa_dask.align(sc, spots)
    assert "constant" in caplog.text
    assert set(ds["gene_constant"].values) == {"gene_0", "gene_1"}
    assert "gene_0" not in set(ds["gene"].values) and ds.attrs["n_genes_used"] == sc.shape[1] - 2
    assert np.isfinite(ds["probability"].values).all()


def test_all_genes_constant_is_an_error(counts_problem):
    sc, spots = counts_problem
    with pytest.raises(SSAInputError, match="usable gene"):
        ssa_dask.align(np.ones_like(sc), spots)


def test_cell_with_constant_profile_is_named(counts_problem):
    sc, spots = counts_problem
    sc = np.vstack([sc, sc.mean(0)])  # the added cell is the mean cell: its z-profile is 0 in every gene
    with pytest.raises(SSAInputError, match=f"1 cell\\(s\\) have a constant z-profile .*row {len(sc) - 1}"):
        ssa_dask.align(sc, spots, n_genes=sc.shape[1], block_rows=128)


def test_wrong_shapes(counts_problem):
    sc, spots = counts_problem
    with pytest.raises(SSAInputError, match="2-D"):
        ssa_dask.align(sc[0], spots)
    with pytest.raises(SSAInputError, match="wrong shape"):
        ssa_dask.read_expression(sc, genes=["a", "b"])
    with pytest.raises(SSAInputError, match="duplicated gene names"):
        ssa_dask.read_expression(sc, genes=["a"] * sc.shape[1])
    with pytest.raises(SSAInputError, match="cannot read input of type"):
        ssa_dask.align({"not": "a matrix"}, spots)


def test_unreadable_and_missing_files(tmp_path, counts_problem):
    _, spots = counts_problem
    garbage = tmp_path / "broken.h5ad"
    garbage.write_bytes(b"this is not HDF5")
    with pytest.raises(SSAInputError, match="cannot read"):
        ssa_dask.align(str(garbage), spots)
    with pytest.raises(SSAInputError, match="no such file"):
        ssa_dask.align(str(tmp_path / "absent.h5ad"), spots)


def test_bad_parameters(counts_problem):
    sc, spots = counts_problem
    with pytest.raises(SSAInputError, match="lam must be positive"):
        ssa_dask.align(sc, spots, lam=0.0)
    with pytest.raises(SSAInputError, match="top_k"):
        ssa_dask.align(sc, spots, top_k=1000)
    with pytest.raises(SSAInputError, match="marginals"):
        ssa_dask.align(sc, spots, marginals="sizes")


def _write_h5ad(path, matrix, genes):
    import anndata as ad
    import pandas as pd

    ad.AnnData(matrix, var=pd.DataFrame(index=genes)).write_h5ad(path)


@pytest.mark.parametrize("problem", ["nan", "gene_mismatch", "negative", "empty_cell"])
def test_cli_reports_the_problem_and_writes_nothing(tmp_path, counts_problem, problem):
    sc, spots = (m.copy() for m in counts_problem)
    genes = [f"g{i}" for i in range(sc.shape[1])]
    spot_genes = genes
    if problem == "nan":
        sc[0, 0] = np.nan
    elif problem == "gene_mismatch":
        spot_genes = [g + "_x" for g in genes]
    elif problem == "negative":
        spots[0, 0] = -1.0
    else:
        sc[3] = 0.0
    _write_h5ad(tmp_path / "sc.h5ad", sc, genes)
    _write_h5ad(tmp_path / "spots.h5ad", spots, spot_genes)
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(app, ["align", str(tmp_path / "sc.h5ad"), str(tmp_path / "spots.h5ad"), "-o", str(out),
                                      "--scheduler", "threads"])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sc.h5ad", "spots.h5ad"]
