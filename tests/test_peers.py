"""Peer methods: the common interface, its measurements, and every method end to end on real data.

The end-to-end problem: the seqFISH mouse embryo slide cut by ``bin_to_spots`` into ~30 spots
(the mean of all its cells), 300 of its cells drawn as the "scRNA-seq" set; the true spot of each
cell is known. Every method must place cells closer to their true spot than the uniform random
floor does, by a clear margin (mean distance < 0.75 x the floor's expected mean distance).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from ssa_dask.errors import SSAInputError
from ssa_dask.evaluation.metrics import mean_euclidean
from ssa_dask.evaluation.peers import (
    METHODS,
    MappingResult,
    PeerUnavailableError,
    available_methods,
    base,
    distmap,
    run_method,
    spaotsc,
)
from ssa_dask.evaluation.simulate import bin_to_spots, sample_replicates

OPTIONAL = {"tangram", "seurat", "novosparc", "moscot"}
# small-problem settings that keep the file fast; the methods' defaults are documented in their modules
FAST_OPTIONS = {"tangram": {"num_epochs": 200, "torch_threads": 1}}


SEQFISH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "seqfish_mouse_embryo"


@pytest.fixture(scope="module")
def seqfish_problem() -> tuple[ad.AnnData, ad.AnnData]:
    path = SEQFISH / "seqfish_mouse_embryo.h5ad"
    if not path.exists():
        pytest.skip("shared dataset seqfish_mouse_embryo not found at ../shared/data (see ../shared/README.md)")
    slide = ad.read_h5ad(path)  # log-normalised already: no log1p
    spots, cell_spot = bin_to_spots(slide, n_spots=30)
    (cells,) = sample_replicates(slide, n_replicates=1, n_cells=300, seed=0, log1p=False, true_spot=cell_spot)
    return cells, spots


def _spot_xy(spots: ad.AnnData) -> np.ndarray:
    return np.column_stack([spots.obs["x"].to_numpy(), spots.obs["y"].to_numpy()])


def _mean_distance(res: MappingResult, cells: ad.AnnData, spots: ad.AnnData) -> float:
    xy = _spot_xy(spots)
    return mean_euclidean(xy[res.spot], xy[cells.obs["true_spot"].to_numpy()])


def _floor(cells: ad.AnnData, spots: ad.AnnData) -> float:
    """Expected mean distance of a uniformly random spot: mean over cells and spots of d(true, spot)."""
    xy = _spot_xy(spots)
    true_xy = xy[cells.obs["true_spot"].to_numpy()]
    return float(np.linalg.norm(true_xy[:, None, :] - xy[None, :, :], axis=2).mean())


def _check_valid(res: MappingResult, name: str, n_cells: int, n_spots: int) -> None:
    assert res.method == name
    assert res.spot.dtype == np.int64 and res.spot.shape == (n_cells,)
    assert res.spot.min() >= 0 and res.spot.max() < n_spots
    assert res.seconds > 0
    assert res.peak_memory_bytes is None or res.peak_memory_bytes >= 0
    if res.probability is not None:
        assert res.probability.shape == (n_cells,)
        assert np.all((res.probability > 0) & (res.probability <= 1 + 1e-9))
    if res.top_spots is not None:
        assert res.top_spots.shape[0] == n_cells
        assert np.array_equal(res.top_spots[:, 0], res.spot)


@pytest.mark.parametrize(
    "name",
    [pytest.param(m, marks=pytest.mark.peers) if m in OPTIONAL else m for m in METHODS if m != "random"],
)
def test_method_beats_random_floor(name, seqfish_problem):
    reason = available_methods()[name]
    if reason is not None:
        pytest.skip(f"peer {name!r} unavailable: {reason}")
    cells, spots = seqfish_problem
    res = run_method(name, cells, spots, seed=0, **FAST_OPTIONS.get(name, {}))
    _check_valid(res, name, cells.n_obs, spots.n_obs)
    distance, floor = _mean_distance(res, cells, spots), _floor(cells, spots)
    assert distance < 0.75 * floor, f"{name}: mean distance {distance:.3f} vs random floor {floor:.3f}"


def test_random_floor_is_seeded_and_uniform(seqfish_problem):
    cells, spots = seqfish_problem
    a = run_method("random", cells, spots, seed=1)
    b = run_method("random", cells, spots, seed=1)
    c = run_method("random", cells, spots, seed=2)
    _check_valid(a, "random", cells.n_obs, spots.n_obs)
    assert np.array_equal(a.spot, b.spot) and not np.array_equal(a.spot, c.spot)
    np.testing.assert_allclose(a.probability, 1.0 / spots.n_obs)
    # its mean distance is that of the analytical floor, up to sampling noise (300 cells)
    assert _mean_distance(a, cells, spots) == pytest.approx(_floor(cells, spots), rel=0.15)


def test_available_methods_imports_no_heavy_dependency():
    code = (
        "import sys\n"
        "from ssa_dask.evaluation.peers import available_methods\n"
        "found = available_methods()\n"
        "heavy = [m for m in ('torch', 'tangram', 'moscot', 'jax', 'novosparc', 'scanpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert set(found) == {'ssa', 'ssa_refined', 'random', 'distmap', 'spaotsc', 'tangram', 'seurat', 'novosparc', 'moscot'}\n"
        "assert found['random'] is None and found['distmap'] is None\n"
        "assert all(v is None or isinstance(v, str) for v in found.values())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _tiny() -> tuple[ad.AnnData, ad.AnnData]:
    rng = np.random.default_rng(0)
    genes = pd.Index([f"g{i}" for i in range(12)])
    cells = ad.AnnData(
        rng.random((20, 12)), obs=pd.DataFrame(index=[f"c{i}" for i in range(20)]), var=pd.DataFrame(index=genes)
    )
    spot_obs = pd.DataFrame({"x": np.arange(6.0), "y": np.zeros(6)}, index=[f"s{i}" for i in range(6)])
    spots = ad.AnnData(rng.random((6, 12)), obs=spot_obs, var=pd.DataFrame(index=genes))
    return cells, spots


def test_unavailable_dependency_raises_peer_unavailable(monkeypatch):
    from ssa_dask.evaluation.peers import tangram as tangram_peer

    monkeypatch.setattr(tangram_peer, "unavailable", lambda: "torch not installed (pip install torch)")
    with pytest.raises(PeerUnavailableError, match="pip install torch"):
        run_method("tangram", *_tiny())


def test_unknown_method_and_option_are_input_errors():
    with pytest.raises(SSAInputError, match="unknown method"):
        run_method("nope", *_tiny())
    with pytest.raises(SSAInputError, match="quantiles"):
        run_method("distmap", *_tiny(), no_such_option=1)


def test_methods_get_the_same_shared_genes():
    cells, spots = _tiny()
    spots = spots[:, list(range(3, 12))].copy()  # the spots lack g0..g2
    problem = base.prepare_problem(cells, spots, n_genes=6)
    assert set(problem.genes) <= {f"g{i}" for i in range(3, 12)}
    top6 = np.asarray(cells.var_names)[np.argsort(-cells.X.var(axis=0), kind="stable")[:6]]
    assert set(problem.genes) == set(top6) & set(spots.var_names)
    assert problem.sc.shape == (20, len(problem.genes)) and problem.spots.shape == (6, len(problem.genes))


def test_measure_counts_child_process_memory():
    code = "import time; x = bytearray(300_000_000); time.sleep(0.6)"
    _, seconds, peak = base.measure(lambda: subprocess.run([sys.executable, "-c", code], check=True))
    assert seconds >= 0.6
    assert peak is not None and peak > 200_000_000


def test_measure_counts_own_allocations():
    def allocate():
        x = np.ones(40_000_000)  # 320 MB, touched
        time.sleep(0.2)
        return float(x[-1])

    out, _, peak = base.measure(allocate)
    assert out == 1.0 and peak > 250_000_000


def test_mcc_matches_definition():
    rng = np.random.default_rng(1)
    c = rng.random((7, 25)) > 0.5
    s = rng.random((4, 25)) > 0.4
    got = distmap.mcc_matrix(c, s)
    for i in range(7):
        for j in range(4):
            tp = np.sum(c[i] & s[j])
            tn = np.sum(~c[i] & ~s[j])
            fp = np.sum(c[i] & ~s[j])
            fn = np.sum(~c[i] & s[j])
            want = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
            assert got[i, j] == pytest.approx(want)


def test_distmap_binarisation_rules():
    spots = np.array([[0.0, 5.0], [1.0, 5.0], [3.0, 5.0]])
    np.testing.assert_array_equal(distmap.binarize_spots(spots), [[False, False], [False, False], [True, False]])
    rng = np.random.default_rng(2)
    sc = rng.random((50, 2)) * (rng.random((50, 2)) > 0.3)
    binary, q = distmap.binarize_cells(sc, distmap.binarize_spots(rng.random((9, 2))), quantiles=[0.2])
    assert q == 0.2
    for g in range(2):
        threshold = np.quantile(sc[:, g][sc[:, g] > 0], 0.2)
        np.testing.assert_array_equal(binary[:, g], sc[:, g] > threshold)


def test_spaotsc_usot_alpha_zero_is_unbalanced_sinkhorn():
    ot = pytest.importorskip("ot", reason="POT is not installed (pip install pot)")
    rng = np.random.default_rng(4)
    cost = rng.random((9, 5))
    a, b = np.full(9, 1 / 9), np.full(5, 1 / 5)
    c1, c2 = rng.random((9, 9)), rng.random((5, 5))
    plan = spaotsc.usot(a, b, cost, c1 + c1.T, c2 + c2.T, alpha=0.0, epsilon=0.1, kappa=1e4, n_outer=3)
    # with alpha = 0 and a large marginal penalty the plan is the balanced entropic OT plan
    np.testing.assert_allclose(plan, ot.sinkhorn(a, b, cost, 0.1), atol=2e-3)
    np.testing.assert_allclose(plan.sum(axis=1), a, rtol=1e-2)


def test_assignment_from_plan_ties_and_empty_rows():
    plan = np.array([[0.1, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0], [4.0, 1.0, 0.0, np.nan]])
    out = base.assignment_from_plan(plan, k=2)
    np.testing.assert_array_equal(out["spot"], [1, -1, 0])
    np.testing.assert_array_equal(out["top_spots"], [[1, 2], [-1, -1], [0, 1]])
    np.testing.assert_allclose(out["probability"], [0.3, np.nan, 0.8])
