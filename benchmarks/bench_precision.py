"""Assignments with a float16 / bfloat16 kernel against float32, on the shared slides and synthetic data.

Protocol (the paper's semi-simulation, as ``ssa-dask benchmark``): a single-cell-resolution slide
is cut into grid spots (``ssa_dask.evaluation.simulate.bin_to_spots``) and a seeded half of its cells is the
scRNA set (``sample_replicates(fraction=0.5)``).  ``ssa_dask.align`` runs with its defaults
(``lam = 0.05``, tol 1e-6) once per kernel dtype, in memory, and each 16-bit run is compared with
the float32 run: the share of cells whose spot changed (target: at most 0.05 %), the spot accuracy
against the true spots of each, the largest change of the row potential ``f`` and the Sinkhorn
iterations.

Usage::

    python benchmarks/bench_precision.py                   # both shared slides + synthetic 20,000 cells
    python benchmarks/bench_precision.py --datasets synthetic --synthetic-cells 5000
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from _common import REPO_ROOT, RESULTS_DIR, loadavg, print_table, write_result

DATA_DIR = REPO_ROOT.parent / "shared" / "data"
#: Paper-protocol binning of each shared slide (as benchmarks/results/paper_protocol/*/run.json).
SLIDES = {"seqfish_mouse_embryo": {"spot_size": 0.2, "log1p": False},
          "xenium_breast_scider": {"spot_size": 400.0, "log1p": True}}
DTYPES = ("float32", "float16", "bfloat16")


def split(adata: Any, spot_size: float | None, n_spots: int | None, log1p: bool, seed: int) -> tuple[Any, Any, np.ndarray]:
    """Spots of the whole slide, a seeded half of the cells, and those cells' true spots."""
    from ssa_dask.evaluation.run import common_cell_filter
    from ssa_dask.evaluation.simulate import bin_to_spots, sample_replicates

    adata.var_names = adata.var_names.astype(str)
    adata, _ = common_cell_filter(adata)
    spots, cell_spot = bin_to_spots(adata, spot_size=spot_size, n_spots=n_spots, log1p=log1p)
    (cells,) = sample_replicates(adata, n_replicates=1, fraction=0.5, seed=seed, log1p=log1p, true_spot=cell_spot)
    return cells, spots, cells.obs["true_spot"].to_numpy()


def compare(name: str, cells: Any, spots: Any, truth: np.ndarray) -> dict[str, Any]:
    """Align with every kernel dtype; the 16-bit runs against the float32 one."""
    import ssa_dask

    runs = {}
    for dtype in DTYPES:
        start = time.perf_counter()
        result = ssa_dask.align(cells, spots, kernel_dtype=dtype, kernel_storage="memory")
        runs[dtype] = {"spot": result["spot"].values, "f": result["potential"].values,
                       "seconds": time.perf_counter() - start, "n_iter": int(result.attrs["n_iter"]),
                       "converged": bool(result.attrs["converged"]), "kernel_dtype": result.attrs["kernel_dtype"]}
    reference = runs["float32"]
    record: dict[str, Any] = {"n_cells": int(cells.n_obs), "n_spots": int(spots.n_obs), "n_genes": int(cells.n_vars)}
    for dtype, run in runs.items():
        changed = run["spot"] != reference["spot"]
        record[dtype] = {
            "changed_cells": int(changed.sum()), "changed_percent": 100 * float(changed.mean()),
            "accuracy": float(np.mean(run["spot"] == truth)), "max_abs_f_change": float(np.abs(run["f"] - reference["f"]).max()),
            "n_iter": run["n_iter"], "converged": run["converged"], "seconds": run["seconds"], "recorded": run["kernel_dtype"],
        }
    print_table(f"{name}: {cells.n_obs:,} cells x {spots.n_obs:,} spots x {cells.n_vars} genes",
                ["kernel", "changed cells", "changed %", "accuracy", "max |df|", "iterations", "seconds"],
                [[d, r["changed_cells"], r["changed_percent"], r["accuracy"], r["max_abs_f_change"], r["n_iter"], r["seconds"]]
                 for d, r in ((d, record[d]) for d in DTYPES)])
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=[*SLIDES, "synthetic"])
    ap.add_argument("--synthetic-cells", type=int, default=20_000)
    ap.add_argument("--synthetic-spots", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="precision/assignments", help="results/<name>.json")
    args = ap.parse_args()
    import anndata as ad

    from ssa_dask.evaluation.simulate import synthetic_tissue

    load_before = loadavg()
    records = {}
    for name in args.datasets:
        if name == "synthetic":
            slide = synthetic_tissue(n_cells=args.synthetic_cells, seed=args.seed)
            cells, spots, truth = split(slide, None, args.synthetic_spots, True, args.seed)
        else:
            cells, spots, truth = split(ad.read_h5ad(DATA_DIR / name / f"{name}.h5ad"), SLIDES[name]["spot_size"], None,
                                        SLIDES[name]["log1p"], args.seed)
        records[name] = compare(name, cells, spots, truth)
    (RESULTS_DIR / args.name).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.name, {"args": vars(args), "protocol": "bin_to_spots + sample_replicates(fraction=0.5), align defaults",
                             "slides": SLIDES, "results": records}, load_before)


if __name__ == "__main__":
    main()
