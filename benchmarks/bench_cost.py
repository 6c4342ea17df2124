"""Cost and kernel construction: ssa_dask's blockwise Pearson cost + exp against dense SGEMM.

The cost ``D = 1 - |rho|`` of ``N`` cells against ``S`` spots over ``G`` genes is, at heart, one
``(N x G) @ (G x S)`` product of z-profiles. One run measures, on the same data and machine:

* **SGEMM**: a dense float32 ``(N x G) @ (G x S)`` with NumPy's BLAS (all cores), whole and in
  the same row blocks as ssa_dask;
* **ssa_dask**: ``build_kernel(cost_blocks(X, cost), lam=0.05, storage="memory")`` on a sparse
  (CSR, ~10 % non-zero) synthetic cell matrix from :mod:`ssa_dask.evaluation.synth`, which is
  exactly what :func:`ssa_dask.align` runs (cost blocks, ``max D`` pass, in-place ``exp``), local
  executor;
  optionally ``storage="zarr"`` too;
* a per-block breakdown (densify, z-score, SGEMM, normalise, stats, exp) on one block, each step
  timed alone (best of ``--repeat``), against ``PearsonCost.cost`` in one call.

Usage::

    python benchmarks/bench_cost.py                          # 50,000 cells x 3,600 spots x 5,000 genes
    python benchmarks/bench_cost.py --cells 20000 --zarr
"""

from __future__ import annotations

import argparse
import gc
import time

import dask.array as da
import numpy as np
import scipy.sparse as sp

from _common import WORK_DIR, PeakMemory, loadavg, print_table, timeit, write_result
from ssa_dask.align import default_block_rows
from ssa_dask.cluster import Executor
from ssa_dask.cost import PearsonCost, cost_blocks
from ssa_dask.kernel._block_math import block_stats as _block_stats
from ssa_dask.kernel._block_math import to_kernel as _to_kernel
from ssa_dask.kernel.build import build_kernel
from ssa_dask.evaluation.synth import SynthModel, SynthParams, generate_cells, generate_spots


def make_data(n_cells: int, n_spots: int, n_genes: int, density: float, seed: int):
    """Synthetic CSR cells, dense spots, and the PearsonCost built from their statistics."""
    model = SynthModel(SynthParams(n_cells=n_cells, n_genes=n_genes, n_spots=n_spots, density=density, seed=seed,
                                   cells_per_spot=4))
    X, _ = generate_cells(model, 0, n_cells)
    X.indptr = X.indptr.astype(np.int32) if X.nnz < 2**31 else X.indptr
    S, _ = generate_spots(model)
    S = S.toarray()
    mean = np.asarray(X.mean(axis=0)).ravel()
    sq = np.asarray(X.multiply(X).mean(axis=0)).ravel()
    std = np.sqrt(np.maximum(sq - mean**2, 0))
    keep = std > 0
    X, S, mean, std = X[:, keep].tocsr(), S[:, keep], mean[keep], std[keep]
    cost = PearsonCost.from_statistics(mean, std, S, S.mean(axis=0), S.std(axis=0) + 1e-12)
    return X, cost


def breakdown(block: sp.csr_matrix, cost: PearsonCost, eps: float) -> dict[str, float]:
    """Seconds of each step of one block's cost + kernel, run one at a time."""
    t = {}
    t0 = time.perf_counter()
    dense = block.toarray()
    t["densify"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    z = dense.astype(np.float32) * cost.scale.astype(np.float32) - cost.shift.astype(np.float32)
    row_sum = z.sum(axis=1, dtype=np.float64)
    row_sq = np.einsum("ij,ij->i", z, z, dtype=np.float64)
    t["z-score + row moments"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    numerator = z @ cost.spot_profiles
    t["SGEMM (block)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    inv = 1.0 / np.sqrt(row_sq - row_sum**2 / z.shape[1])
    rho = numerator * inv.astype(np.float32)[:, None]
    np.clip(rho, -1, 1, out=rho)
    np.abs(rho, out=rho)
    np.subtract(np.float32(1.0), rho, out=rho)
    t["normalise + 1-|rho|"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _block_stats(rho)
    t["max/NaN stats pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _to_kernel(rho, eps)
    t["exp(-D/eps) in place"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cost.cost(block)
    t["PearsonCost.cost (whole step)"] = time.perf_counter() - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--spots", type=int, default=3_600)
    ap.add_argument("--genes", type=int, default=5_000)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--block-rows", type=int, default=None, help="default: ssa_dask.align.default_block_rows")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--zarr", action="store_true", help="also time storage='zarr' (writes K under benchmarks/_work)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="cost")
    args = ap.parse_args()
    load_before = loadavg()
    executor = Executor()

    with PeakMemory() as mem:
        X, cost = make_data(args.cells, args.spots, args.genes, args.density, args.seed)
        n, g = X.shape
        s = cost.n_spots
        rows = args.block_rows or default_block_rows(n, s, g, executor.n_threads())
        Xd = da.from_array(X, chunks=(rows, g), asarray=False, meta=X[:0])
        flops = 2.0 * n * g * s

        rng = np.random.default_rng(1)
        A = rng.standard_normal((n, g), dtype=np.float32)
        B = np.ascontiguousarray(cost.spot_profiles)
        sgemm = timeit(lambda: A @ B, repeat=args.repeat)
        sgemm_blocks = timeit(lambda: [A[i : i + rows] @ B for i in range(0, n, rows)], repeat=args.repeat)
        del A
        gc.collect()

        def ours_memory():
            return build_kernel(cost_blocks(Xd, cost), executor, lam=0.05, storage="memory")

        kernel = ours_memory()
        eps = kernel.eps
        kernel.close()
        del kernel
        gc.collect()
        ours_times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            kernel = ours_memory()
            ours_times.append(time.perf_counter() - t0)
            kernel.close()
            del kernel
            gc.collect()
        ours = min(ours_times)

        zarr_s = None
        if args.zarr:
            WORK_DIR.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            kernel = build_kernel(cost_blocks(Xd, cost), executor, lam=0.05, storage="zarr", path=WORK_DIR)
            zarr_s = time.perf_counter() - t0
            kernel.close()

        runs = [breakdown(X[:rows], cost, eps) for _ in range(args.repeat)]
        parts = {k: min(r[k] for r in runs) for k in runs[0]}

    ratio = ours / sgemm.best
    print(f"cells {n:,} x spots {s:,} x genes {g:,}; CSR density {X.nnz / (n * g):.3f}; block_rows {rows} "
          f"({-(-n // rows)} blocks); load {load_before}")
    rows_out = [
        ["dense SGEMM (N x G) @ (G x S), whole", sgemm.best, 1.0, flops / sgemm.best / 1e9],
        ["dense SGEMM, same row blocks", sgemm_blocks.best, sgemm_blocks.best / sgemm.best, flops / sgemm_blocks.best / 1e9],
        ["ssa_dask cost + exp, storage=memory", ours, ratio, flops / ours / 1e9],
    ]
    if zarr_s is not None:
        rows_out.append(["ssa_dask cost + exp, storage=zarr", zarr_s, zarr_s / sgemm.best, flops / zarr_s / 1e9])
    print_table("Cost + kernel construction", ["method", "seconds", "x SGEMM", "GFLOP/s (2NGS)"], rows_out)
    total = parts["PearsonCost.cost (whole step)"]
    print_table(f"Breakdown of one block ({rows} cells, best of {args.repeat} per step, BLAS on all cores)",
                ["step", "ms", "share of PearsonCost.cost"],
                [[k, v * 1e3, v / total] for k, v in parts.items()])
    print(f"peak RSS {mem.peak_gib:.2f} GiB")
    write_result(args.name, {
        "args": vars(args), "shape": {"cells": n, "spots": s, "genes": g, "nnz": int(X.nnz)}, "block_rows": rows,
        "sgemm_s": sgemm.best, "sgemm_blocks_s": sgemm_blocks.best, "ours_memory_s": ours, "ours_memory_times": ours_times,
        "ours_zarr_s": zarr_s, "ours_over_sgemm": ratio, "block_breakdown_s": parts, "eps": eps,
        "peak_rss_gib": mem.peak_gib,
    }, load_before)


if __name__ == "__main__":
    main()
