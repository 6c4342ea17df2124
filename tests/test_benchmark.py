"""The benchmark end to end on a small synthetic tissue, its scoring and its commands."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ssa_dask.evaluation import (
    BenchmarkConfig,
    peers,
    run_benchmark,
    score_mapping,
    synthetic_tissue,
    write_outputs,
)
from ssa_dask.evaluation.tables import markdown_table


def _spots() -> ad.AnnData:
    obs = pd.DataFrame(
        {"x": [0.5, 10.5, 0.5], "y": [0.5, 0.5, 20.5], "grid_i": [0, 1, 0], "grid_j": [0, 0, 2]},
        index=["spot_0_0", "spot_1_0", "spot_0_2"],
    )
    return ad.AnnData(X=np.zeros((3, 2), dtype=np.float32), obs=obs)


def test_score_mapping_hand_values():
    spots = _spots()
    # cell 0 right; cell 1 on (1,0) instead of (0,2): grid distance sqrt(1 + 4), Manhattan 3,
    # coordinates (10, -20) apart; cell 2 unmapped (left out of distances, counted wrong)
    scores = score_mapping(np.array([0, 1, -1]), np.array([0, 2, 1]), spots, top_spots=np.array([[0, 1], [1, 2], [-1, -1]]))
    assert scores["n_mapped"] == 2
    assert scores["euclidean_grid"] == pytest.approx(np.sqrt(5) / 2)
    assert scores["manhattan_grid"] == pytest.approx(1.5)
    assert scores["euclidean"] == pytest.approx(np.sqrt(500) / 2)
    assert scores["manhattan"] == pytest.approx(15.0)
    assert scores["accuracy"] == pytest.approx(1 / 3)
    assert scores["topk_accuracy"] == pytest.approx(2 / 3) and scores["k"] == 2


def test_markdown_table_bolds_row_minimum():
    frame = pd.DataFrame({"a": [1.0, 0.5], "b": [2.0, np.nan]}, index=["replicate 0", "sd"])
    text = markdown_table(frame, bold="min")
    assert "| replicate 0 | **1.000** | 2.000 |" in text
    assert "| sd | 0.500 | — |" in text


@pytest.fixture(scope="module")
def tissue() -> ad.AnnData:
    return synthetic_tissue(n_cells=1500, n_genes=120, n_types=4, seed=5)


def test_benchmark_end_to_end(tissue, tmp_path, monkeypatch):
    real = peers.run_method

    def run_method(name, sc, spots, seed=0, **options):
        # stand-ins for peers whose dependency is absent or that crash, to test the reporting
        if name == "seurat":
            raise peers.PeerUnavailableError("seurat cannot run: Rscript not found (test stand-in)")
        if name == "tangram":
            raise RuntimeError("boom (test stand-in)")
        assert "x" not in sc.obs and "true_spot" not in sc.obs  # no leak of the truth
        assert list(spots.obs.columns) == ["x", "y", "n_cells"]  # coordinates and the segmentation count only
        return real(name, sc, spots, seed=seed, **options)

    monkeypatch.setattr(peers, "run_method", run_method)
    cfg = BenchmarkConfig(
        methods=("ssa", "distmap", "random", "seurat", "tangram"),
        n_replicates=2,
        n_spots=120,
        fraction=0.4,
        lambdas=(0.02, 0.1),
        n_genes_sweep=(20, 5000),
        sweep_replicates=1,
    )
    result = run_benchmark(tissue, cfg, progress=False, name="synthetic")
    m = result.metrics.set_index(["method", "replicate"])
    assert (m.loc["ssa", "status"] == "ok").all() and (m.loc["random", "status"] == "ok").all()
    assert (m.loc["seurat", "status"] == "unavailable").all()
    assert (m.loc["tangram", "status"] == "failed").all()
    assert "boom" in m.loc[("tangram", 0), "reason"]
    ssa, rnd = m.loc["ssa"], m.loc["random"]
    assert (ssa["euclidean_grid"].to_numpy() < rnd["euclidean_grid"].to_numpy()).all()
    assert (ssa["accuracy"].to_numpy() > rnd["accuracy"].to_numpy()).all()
    # coordinate and grid units agree up to the grid side (centroids sit inside their squares)
    side = result.spots.uns["ssa_simulation"]["spot_size"]
    ratio = ssa["euclidean"] / (ssa["euclidean_grid"] * side)
    assert ((ratio > 0.7) & (ratio < 1.3)).all()
    assert set(result.kl["method"]) == {"ssa", "distmap", "random"}
    assert set(result.sweeps["lam"]) >= {0.02, 0.1} and (result.sweeps["status"] == "ok").all()

    files = write_outputs(result, tmp_path)
    for name in (
        "table_euclidean.md", "table_manhattan.csv", "table_euclidean_coord.csv", "wilcoxon_euclidean.md",
        "runtime_memory.csv", "per_type_kl.csv", "spot_map.png", "pred_vs_true.png", "kl_boxplot.png",
        "lambda_sweep.png", "n_genes_sweep.png", "summary.md",
    ):
        assert files[name].exists() and files[name].stat().st_size > 0, name
    table = pd.read_csv(tmp_path / "table_euclidean.csv", index_col=0)
    assert table.loc["mean", "ssa"] == pytest.approx(ssa["euclidean_grid"].mean())
    assert np.isnan(table.loc["mean", "seurat"])
    md = (tmp_path / "table_euclidean.md").read_text()
    assert "Rscript not found" in md and "boom" in md
    summary = (tmp_path / "summary.md").read_text()
    assert "## SSA against each method" in summary
    assert all((tmp_path / f).stat().st_size < 300_000 for f in files if f.endswith(".png"))


def test_cli_simulate_and_benchmark(tissue, tmp_path):
    from ssa_dask.cli import evaluate  # noqa: F401  (registers the commands)
    from ssa_dask.cli._app import app

    path = tmp_path / "tissue.h5ad"
    tissue.write_h5ad(path)
    runner = CliRunner()
    sim = runner.invoke(app, ["simulate", str(path), str(tmp_path / "sim"), "--n-spots", "80", "--replicates", "2", "--fraction", "0.3"])
    assert sim.exit_code == 0, sim.output
    reps = sorted((tmp_path / "sim" / "replicates").glob("*.h5ad"))
    assert len(reps) == 2 and ad.read_h5ad(reps[0]).n_obs == 450
    again = runner.invoke(app, ["simulate", str(path), str(tmp_path / "sim"), "--n-spots", "80"])
    assert again.exit_code == 2 and "exists" in again.output

    args = ["benchmark", str(path), str(tmp_path / "bench"), "--methods", "distmap,random", "--replicates", "2",
            "--n-spots", "80", "--fraction", "0.3", "--lambdas", "", "--n-genes-sweep", "", "--quiet"]
    bench = runner.invoke(app, args)
    assert bench.exit_code == 0, bench.output
    assert (tmp_path / "bench" / "summary.md").exists() and (tmp_path / "bench" / "run.json").exists()
    assert "distmap" in (tmp_path / "bench" / "benchmark.log").read_text()
    assert runner.invoke(app, args).exit_code == 2  # refuses to overwrite
    bad = runner.invoke(app, [*args[:3], "--methods", "nope", "--overwrite"])
    assert bad.exit_code == 2 and "unknown methods" in bad.output


def test_empty_cells_are_filtered_for_every_method_before_sampling(caplog, tmp_path):
    import scipy.sparse as sp

    slide = synthetic_tissue(n_cells=400, n_genes=60, n_types=3, seed=2)
    empty = [5, 123, 399]
    keep = np.ones(slide.n_obs)
    keep[empty] = 0
    slide.X = sp.csr_matrix(sp.diags(keep) @ slide.X)  # cells with no counts over the panel, as on real Xenium slides
    slide.X.eliminate_zeros()
    cfg = BenchmarkConfig(methods=("ssa", "random"), n_replicates=2, n_spots=40, fraction=1.0, lambdas=(),
                          n_genes_sweep=(), sweep_replicates=0)
    with caplog.at_level("WARNING", logger="ssa_dask"):
        result = run_benchmark(slide, cfg, progress=False, name="with-empty")
    assert "common cell filter: 3 of 400 cells" in caplog.text
    record = result.dataset["cell_filter"]
    assert record["n_cells_input"] == 400 and record["n_cells_removed"] == 3
    assert record["removed"] == [str(slide.obs_names[i]) for i in empty]
    m = result.metrics
    # fraction=1.0 draws every remaining cell: without the filter each replicate holds the empty cells
    # and SSA alone fails on it
    assert (m["status"] == "ok").all() and (m["n_cells"] == 397).all()
    assert not set(record["removed"]) & set(result.example.index)
    assert int(result.spots.obs["n_cells"].sum()) == 397
    write_outputs(result, tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "- Cell filter: 3 of 400 cells removed for every method before binning and sampling" in summary
