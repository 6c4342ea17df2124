"""Whole-slide SSA with a sparse (multiscale) kernel: how close it is to the dense plan, and what it costs.

``compare`` solves one synthetic problem (``ssa-dask synth``) with the dense kernel and with sparse
kernels of several supports (:mod:`ssa_dask.kernel.multiscale`) in one process, and reports against
the dense solution: column-marginal error, L1 of ``T - T_dense`` (both plans sum to 1, so it lies
in [0, 2]), agreement of each cell's best spot, per-spot cell-type composition (L1 over spots and
types of the per-type mass, and the mean over spots of the correlation of the type vectors),
accuracy against the synthetic truth (``obs["true_spot"]``), the sample check of the support
(:func:`ssa_dask.kernel.multiscale.check_support`) and the time of each stage.  It also measures
the low-rank route (Nystrom on ``r`` landmark spots) by its kernel error on a sample of cells.

``scale`` runs the sparse route alone (the whole ``align`` pipeline's stages: read, statistics,
clusters, support, Sinkhorn, assignment) and reports time per stage and peak RSS; run it through
``--child`` to sample the RSS of a fresh process.

``DATA`` is a synthetic set, or a real single-cell slide (``.h5ad`` with ``obs`` x, y and
``cell_type``) binned into about ``--slide-spots`` square spots (its cells' bins are the truth).

Usage::

    ssa-dask synth DATA --cells 50000 --spots 20000 --genes 500
    python benchmarks/bench_whole_slide.py compare DATA --support 32 128 512 --name compare_50000x20000
    python benchmarks/bench_whole_slide.py scale DATA --support 256 --child --name scale_200000x20000

Timings are noisy on a shared machine: compare the routes measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# One BLAS thread per Dask thread: the sparse build's GEMMs are small (a cluster's spots against the
# cells that probe it), and two BLAS threads under each of two Dask threads ran them ~5x slower on
# the loaded 2-core machine.  Set before NumPy loads its BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK_DIR, PeakMemory, loadavg, print_table, run_child, write_result  # noqa: E402

LAM = 0.05
TOL = 1e-6
MAX_ITER = 2000


def load_synth(data: Path) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """Cells and spots of a synthetic set (``ssa-dask synth``), the cells' types and true spots."""
    import anndata as ad

    obs = ad.read_zarr(str(data / "cells.zarr")).obs
    types = np.unique(obs["cell_type"].astype(str).to_numpy(), return_inverse=True)[1]
    return str(data / "cells.zarr"), str(data / "spots.zarr"), types, obs["true_spot"].to_numpy()


def load_slide(h5ad: Path, n_spots: int) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """A real single-cell slide binned into about ``n_spots`` square spots (both log1p, as the paper)."""
    import anndata as ad

    from ssa_dask.evaluation.simulate import bin_to_spots

    cells = ad.read_h5ad(h5ad)
    spots, cell_spot = bin_to_spots(cells, n_spots=n_spots, log1p=True)
    cells.X = cells.X.log1p() if hasattr(cells.X, "log1p") else np.log1p(cells.X)
    types = np.unique(cells.obs["cell_type"].astype(str).to_numpy(), return_inverse=True)[1]
    return cells, spots, types, np.asarray(cell_spot)


def prepare(cells_in: Any, spots_in: Any, types: np.ndarray, true_spot: np.ndarray, executor: Any,
            block_rows: int) -> dict[str, Any]:
    """Cells and spots read as ``align`` reads them: genes, cost, masses, and the truth."""
    from ssa_dask.cost import PearsonCost
    from ssa_dask.genes import select_genes
    from ssa_dask.io import read_expression
    from ssa_dask.standardize import summarize

    t0 = time.perf_counter()
    cells = read_expression(cells_in, role="scRNA")
    spots = read_expression(spots_in, role="spots")
    cell_summary = summarize(cells.X, executor)
    spot_summary = summarize(spots.X, executor)
    genes = select_genes(cells.genes, cell_summary.variance, spots.genes, spot_summary.variance, 5000).genes
    cc, sc = cells.genes.get_indexer(genes), spots.genes.get_indexer(genes)
    (spot_values,) = executor.compute(spots.select_genes(genes).X)
    cost = PearsonCost.from_statistics(cell_summary.mean[cc], cell_summary.std[cc], spot_values,
                                       spot_summary.mean[sc], spot_summary.std[sc])
    return {
        "X": cells.select_genes(genes).rechunk_rows(block_rows).X,
        "cost": cost,
        "p": cell_summary.row_totals / cell_summary.row_totals.sum(),
        "q": spot_summary.row_totals / spot_summary.row_totals.sum(),
        "types": types,
        "true_spot": true_spot,
        "read_seconds": time.perf_counter() - t0,
    }


def _load(args: argparse.Namespace, executor: Any) -> dict[str, Any]:
    data = Path(args.data)
    inputs = load_slide(data, args.slide_spots) if data.suffix == ".h5ad" else load_synth(data)
    return prepare(*inputs, executor, args.block_rows)


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def solve(kernel: Any, data: dict[str, Any], executor: Any) -> dict[str, Any]:
    """Sinkhorn and the best spot per cell on a built kernel, timed."""
    from ssa_dask import sinkhorn

    result, sinkhorn_s = _timed(lambda: sinkhorn(kernel, data["p"], data["q"], tol=TOL, max_iter=MAX_ITER,
                                                 executor=executor))
    (spot, _, _), assign_s = _timed(lambda: kernel.top_k(data["p"], result.g, 1, executor))
    return {"g": result.g, "spot": spot[:, 0], "n_iter": result.n_iter, "converged": result.converged,
            "marginal_error": result.marginal_error, "sinkhorn_s": sinkhorn_s,
            "sinkhorn_s_per_iter": sinkhorn_s / result.n_iter, "assign_s": assign_s}


def _plan_rows(kernel: Any, index: int, p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Rows of block ``index`` of the plan after the row update, ``p_i K_ij b_j / (K b)_i``, dense float64."""
    from ssa_dask.kernel._block_math import load_block, scaling
    from ssa_dask.kernel._sparse_block_math import dense_rows

    a, b = kernel.bounds[index], kernel.bounds[index + 1]
    if getattr(kernel.storage, "n_support", 0):
        rows = dense_rows(kernel.blocks[index], kernel.n_spots)
    else:
        rows = np.asarray(load_block(kernel.blocks[index]), np.float64)
    rows *= scaling(g, kernel.eps)
    return rows * (p[a:b] / rows.sum(axis=1))[:, None]


def plan_differences(dense: Any, dense_fit: dict[str, Any], sparse: Any, sparse_fit: dict[str, Any],
                     p: np.ndarray, types: np.ndarray) -> dict[str, float]:
    """L1 of the plans' difference and the per-spot type composition of both, block by block."""
    n_types = int(types.max()) + 1
    l1 = 0.0
    comp_d = np.zeros((n_types, dense.n_spots))
    comp_s = np.zeros_like(comp_d)
    for index in range(len(dense.blocks)):
        a, b = dense.bounds[index], dense.bounds[index + 1]
        td = _plan_rows(dense, index, p, dense_fit["g"])
        ts = _plan_rows(sparse, index, p, sparse_fit["g"])
        l1 += float(np.abs(td - ts).sum())
        onehot = np.eye(n_types)[types[a:b]]
        comp_d += onehot.T @ td
        comp_s += onehot.T @ ts
    cd, cs = comp_d - comp_d.mean(0), comp_s - comp_s.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (cd * cs).sum(0) / np.sqrt((cd**2).sum(0) * (cs**2).sum(0))
    return {"plan_l1": l1, "composition_l1": float(np.abs(comp_d - comp_s).sum()),
            "composition_corr_mean": float(np.nanmean(corr)), "composition_corr_p05": float(np.nanquantile(corr, 0.05))}


def nystrom_error(data: dict[str, Any], eps: float, rank: int, n_rows: int = 2000, seed: int = 0) -> dict[str, float]:
    """Low-rank route: Nystrom ``K_{:,L} K_{LL}^+ K_{L,:}`` on ``rank`` random landmark spots, on a sample of cells."""
    from ssa_dask.kernel._block_math import to_kernel

    cost, X = data["cost"], data["X"]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(X.shape[0], min(n_rows, X.shape[0]), replace=False))
    landmarks = np.sort(rng.choice(cost.n_spots, min(rank, cost.n_spots), replace=False))
    K = to_kernel(cost.cost(X[rows].compute()), eps).astype(np.float64)
    # the kernel between spots (landmarks are spots): the same |rho| of their unit profiles
    rho = np.abs(cost.spot_profiles[:, landmarks].T.astype(np.float64) @ cost.spot_profiles[:, landmarks])
    K_ll = np.exp(-(1.0 - np.minimum(rho, 1.0)) / eps)
    rho_ls = np.abs(cost.spot_profiles[:, landmarks].T.astype(np.float64) @ cost.spot_profiles)
    K_ls = np.exp(-(1.0 - np.minimum(rho_ls, 1.0)) / eps)
    approx = K[:, landmarks] @ np.linalg.pinv(K_ll, rcond=1e-10) @ K_ls
    return {"nystrom_rank": int(landmarks.size),
            "nystrom_rel_frobenius_error": float(np.linalg.norm(approx - K) / np.linalg.norm(K)),
            "nystrom_negative_fraction": float((approx < 0).mean()),
            "nystrom_row_sum_rel_error_median": float(np.median(np.abs(approx.sum(1) - K.sum(1)) / K.sum(1))),
            "nystrom_argmax_agreement": float((approx.argmax(1) == K.argmax(1)).mean())}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    from ssa_dask import Executor, SinkhornNumericalError
    from ssa_dask.cost import cost_blocks
    from ssa_dask.kernel.build import build_kernel
    from ssa_dask.kernel.multiscale import build_multiscale_kernel, check_support

    executor = Executor()
    data = _load(args, executor)
    n_cells, n_spots = data["X"].shape[0], data["cost"].n_spots
    print(f"{n_cells} cells x {n_spots} spots x {data['X'].shape[1]} genes; read {data['read_seconds']:.1f} s", flush=True)
    dense, build_s = _timed(lambda: build_kernel(cost_blocks(data["X"], data["cost"]), executor, lam=LAM,
                                                 log_domain=False))
    dense_fit = solve(dense, data, executor)
    rows = [{"route": "dense", "n_support": n_spots, "build_s": build_s, "kernel_gb": n_cells * n_spots * 4 / 1e9,
             **{k: v for k, v in dense_fit.items() if k not in ("g", "spot")},
             "accuracy": float((dense_fit["spot"] == data["true_spot"]).mean()), "eps": dense.eps,
             "max_cost": dense.max_cost}]
    print(rows[-1], flush=True)
    variants = [(k, far, False) for k in args.support for far in args.far]
    variants += [(k, 0, True) for k in args.exact_top_k]
    for n_support, n_far, probe_all in variants:
        (sparse, check), build_s = _timed(lambda: build_multiscale_kernel(
            data["X"], data["cost"], executor, lam=LAM, n_support=n_support, n_far=n_far, n_sample=args.sample,
            n_probe=10**9 if probe_all else None))
        route = "exact top-k" if probe_all else "multiscale + far field" if n_far else "multiscale truncation"
        try:
            fit = solve(sparse, data, executor)
        except SinkhornNumericalError as exc:  # a support that cannot carry the marginals (no far field)
            rows.append({"route": route, "n_support": n_support, "build_s": build_s, "failed": str(exc)})
            print(rows[-1], flush=True)
            sparse.close()
            continue
        check_support(check, data["X"], data["cost"], sparse, fit["g"], executor)
        rows.append({"route": route, "n_support": n_support, "build_s": build_s,
                     "kernel_gb": n_cells * (2 * n_support + 1) * 4 / 1e9,
                     **{k: v for k, v in fit.items() if k not in ("g", "spot")}, "eps": sparse.eps, **check.summary(),
                     "best_spot_agreement_all": float((fit["spot"] == dense_fit["spot"]).mean()),
                     "accuracy": float((fit["spot"] == data["true_spot"]).mean()),
                     **plan_differences(dense, dense_fit, sparse, fit, data["p"], data["types"])})
        print(rows[-1], flush=True)
        sparse.close()
    nystrom = [nystrom_error(data, dense.eps, rank) for rank in args.nystrom]
    dense.close()
    columns = ["route", "n_support", "build_s", "n_iter", "sinkhorn_s_per_iter", "marginal_error", "plan_l1",
               "best_spot_agreement_all", "best_spot_agreement", "support_mass_median", "row_sum_error_median",
               "composition_l1", "composition_corr_mean", "accuracy"]
    print_table(f"dense vs sparse, {n_cells} x {n_spots}", columns, [[r.get(c, "") for c in columns] for r in rows])
    print_table("low-rank (Nystrom) kernel error on 2,000 cells", list(nystrom[0]) if nystrom else [],
                [list(r.values()) for r in nystrom])
    return {"n_cells": n_cells, "n_spots": n_spots, "n_genes": int(data["X"].shape[1]), "lam": LAM, "tol": TOL,
            "routes": rows, "nystrom": nystrom, "read_seconds": data["read_seconds"]}


def scale(args: argparse.Namespace) -> dict[str, Any]:
    from ssa_dask import Executor
    from ssa_dask.kernel.multiscale import build_multiscale_kernel, check_support

    executor = Executor()
    with PeakMemory() as memory:
        data = _load(args, executor)
        n_cells, n_spots = data["X"].shape[0], data["cost"].n_spots
        (sparse, check), build_s = _timed(lambda: build_multiscale_kernel(
            data["X"], data["cost"], executor, lam=LAM, n_support=args.support[0], n_sample=args.sample))
        fit = solve(sparse, data, executor)
        check_support(check, data["X"], data["cost"], sparse, fit["g"], executor)
        sparse.close()
    row = {"n_cells": n_cells, "n_spots": n_spots, "n_genes": int(data["X"].shape[1]), "n_support": args.support[0],
           "read_s": data["read_seconds"], "build_s": build_s,
           **{k: v for k, v in fit.items() if k not in ("g", "spot")}, **check.summary(),
           "accuracy": float((fit["spot"] == data["true_spot"]).mean()), "peak_rss_gib_in_process": memory.peak_gib,
           "kernel_gb": n_cells * args.support[0] * 8 / 1e9}
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["compare", "scale"])
    parser.add_argument("data", help="directory written by `ssa-dask synth`, or a single-cell slide (.h5ad) to bin")
    parser.add_argument("--slide-spots", type=int, default=5000, help="spots to bin an .h5ad slide into")
    parser.add_argument("--support", type=int, nargs="+", default=[32, 128, 512],
                        help="spots kept per cell (scale: the first)")
    parser.add_argument("--far", type=int, nargs="+", default=[0, 256],
                        help="far-field spots per cell (0: plain truncation) of each multiscale support")
    parser.add_argument("--exact-top-k", type=int, nargs="*", default=[128],
                        help="supports also solved with every cluster probed (exact top-k truncation, no far field)")
    parser.add_argument("--nystrom", type=int, nargs="*", default=[500], help="Nystrom ranks to measure")
    parser.add_argument("--sample", type=int, default=2000, help="cells of the support check")
    parser.add_argument("--block-rows", type=int, default=4096)
    parser.add_argument("--name", help="write results/whole_slide/NAME.json")
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help="run in a fresh process and sample its peak RSS")
    args = parser.parse_args(argv)
    load = loadavg()
    if args.child:
        out = Path(args.result) if args.result else WORK_DIR / "whole_slide" / f"{args.name or args.mode}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--child"]
        payload = run_child(__file__, forwarded, out.with_suffix(".child.json"), out.with_suffix(".log"))
    else:
        payload = compare(args) if args.mode == "compare" else scale(args)
        if args.result:
            Path(args.result).write_text(json.dumps(payload, default=float))
            return
    if args.name:
        write_result(f"whole_slide/{args.name}", payload, load)


if __name__ == "__main__":
    main()
