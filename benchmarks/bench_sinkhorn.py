"""Sinkhorn iteration speed: ssa_dask against the memory-bandwidth bound, POT and plain NumPy.

One run measures, on the same machine and the same float32 kernel ``K = exp(-D/eps)`` of a random
cost ``D`` in [0, 1] (``cells x spots``):

* the memory read bandwidth (best of NumPy and Numba readers), and the per-iteration bound
  ``bytes(K) / bandwidth`` (an iteration must read ``K`` at least once);
* ssa_dask's ``sinkhorn`` (fused one-pass sweep, local executor as used by ``align(client=None)``)
  per iteration, for a few block sizes, and the same Numba sweep called directly from a bare
  thread pool (the floor without any ssa_dask orchestration);
* the same ``sinkhorn`` on the kernel stored as float16 and bfloat16 (``kernel_dtype``, 2 bytes
  per entry, decoded in the sweep) at the best float32 block size, per iteration and as a ratio
  to the float32 read bound (target: float16 at most 1.0x one float32 read of ``K``);
* POT's ``ot.sinkhorn(p, q, M, reg)`` with ``M = -eps log K`` and ``reg = eps`` (so POT rebuilds
  the same ``K``), per iteration as ``(t(n2) - t(n1)) / (n2 - n1)`` (``n1 = 10``, ``n2 - n1`` a
  multiple of 10, so POT's error check every 10th iteration is counted at its real rate) so its
  set-up (``exp``, the ``K / p`` copy, the returned plan) cancels, in float32 and float64;
* a plain NumPy two-pass iteration ``a = p / (K b)``, ``b = q / (K^T a)``;
* total time to the same tolerance (ssa_dask: L1 error of the column marginal < tol; POT:
  L2 error < stopThr = tol, which is the weaker test since L2 <= L1).

Usage::

    python benchmarks/bench_sinkhorn.py                      # 50,000 x 3,600
    python benchmarks/bench_sinkhorn.py --cost geometric --name sinkhorn_geometric
    python benchmarks/bench_sinkhorn.py --cells 20000 --spots 1000 --iters 20 --no-pot64
    python benchmarks/bench_sinkhorn.py --cells 200000 --spots 4000 --iters 10 --repeat 2 \
        --block-rows 12500 --no-pot64 --pot-cost-on-disk --max-iter 200 --zarr \
        --name precision/sinkhorn_200k                                  # kernel dtypes and storages at scale

After ssa_dask's runs, ``K`` is turned into POT's cost ``M = -eps log K`` in place, so the run
holds one float32 matrix besides POT's own copies (``--pot-cost-on-disk`` memory-maps ``M`` from
``benchmarks/_work`` instead, so the page cache can drop it while POT holds its kernel and plan).
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ot

from _common import RESULTS_DIR, WORK_DIR, PeakMemory, loadavg, measure_bandwidth, print_table, timeit, write_result
from ssa_dask.kernel import _sweeps
from ssa_dask.errors import ConvergenceWarning
from ssa_dask.kernel._block_math import scaling as _scaling
from ssa_dask.cluster import Executor
from ssa_dask.kernel.build import build_kernel, kernel_from_array
from ssa_dask.sinkhorn import sinkhorn


def make_problem(n_cells: int, n_spots: int, lam: float, seed: int, cost: str = "random"):
    """The float32 kernel at ``eps = lam * max D`` of a cost in [0, 1] (computed in the cost's
    memory), and random marginals.

    ``cost="random"``: i.i.d. uniform entries (Sinkhorn converges in a few iterations).
    ``cost="geometric"``: squared distances between random points in the unit square, scaled to
    [0, 1] (a structured problem that needs many more iterations to reach the same tolerance).
    """
    rng = np.random.default_rng(seed)
    if cost == "random":
        D = rng.random((n_cells, n_spots), dtype=np.float32)
    elif cost == "geometric":
        x, y = rng.random((n_cells, 2)).astype(np.float32), rng.random((n_spots, 2)).astype(np.float32)
        D = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
        np.maximum(D, 0, out=D)
        D /= D.max()
    else:
        raise ValueError(f"unknown cost {cost!r}")
    eps = float(lam * D.max())
    D *= np.float32(-1.0 / eps)
    K = np.exp(D, out=D)
    p = rng.uniform(0.5, 1.5, n_cells)
    q = rng.uniform(0.5, 1.5, n_spots)
    return K, p / p.sum(), q / q.sum(), eps


def zarr_kernel(K: np.ndarray, eps: float, block_rows: int, kernel_dtype: str):
    """The same kernel built into a kernel store under ``benchmarks/_work`` (chunks memory-mapped by the sweep).

    ``build_kernel`` starts from the cost, so it gets ``D = -eps log K`` blockwise (and gives back
    the same ``K``, to float32 rounding).
    """
    import dask.array as da

    cost = da.from_array(K, chunks=(block_rows, K.shape[1]), name=False).map_blocks(
        lambda block: np.float32(-eps) * np.log(block), dtype=np.float32)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    return build_kernel(cost, Executor(), lam=None, eps=eps, log_domain=False, storage="zarr", path=WORK_DIR,
                        kernel_dtype=kernel_dtype)


def ours_per_iteration(K, p, q, eps, block_rows: int, iters: int, repeat: int, kernel_dtype: str = "float32",
                       storage: str = "memory") -> dict:
    """ssa_dask.sinkhorn with a fixed iteration count (tol = 0 never stops early), kernel in memory or in Zarr."""
    if storage == "zarr":
        kernel = zarr_kernel(K, eps, block_rows, kernel_dtype)
    else:
        kernel = kernel_from_array(K, eps=eps, block_rows=block_rows, max_cost=1.0, kernel_dtype=kernel_dtype)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return sinkhorn(kernel, p, q, tol=1e-300, max_iter=iters)

    try:
        timing = timeit(run, repeat=repeat)
        return {"block_rows": block_rows, "n_blocks": len(kernel.blocks), "per_iter_s": timing.best / iters,
                "kernel_dtype": kernel_dtype, "storage": storage}
    finally:
        kernel.close()


def bare_sweep(K, p, q, eps, block_rows: int, iters: int, repeat: int, threads: int) -> float:
    """The same Numba sweep over the same blocks, from a plain thread pool: seconds per iteration."""
    starts = range(0, K.shape[0], block_rows)
    blocks = [(K[s : s + block_rows], np.ascontiguousarray(p[s : s + block_rows])) for s in starts]
    g = np.zeros(K.shape[1])

    def one_iteration(pool) -> None:
        nonlocal g
        b = _scaling(g, eps).astype(np.float32)

        def part(blk):
            out = np.zeros(K.shape[1])
            _sweeps.kernel_sweep(blk[0], blk[1], b, out)
            return out

        column = np.sum(list(pool.map(part, blocks)), axis=0)
        g = g + eps * (np.log(q) - np.log(column))

    with ThreadPoolExecutor(threads) as pool:
        timing = timeit(lambda: [one_iteration(pool) for _ in range(iters)], repeat=repeat)
    return timing.best / iters


def numpy_two_pass(K, p, q, iters: int, repeat: int) -> float:
    """Textbook two-pass iteration in NumPy (BLAS sgemv twice): seconds per iteration."""
    p32, q32 = p.astype(np.float32), q.astype(np.float32)

    def run():
        b = np.ones(K.shape[1], dtype=np.float32)
        for _ in range(iters):
            a = p32 / (K @ b)
            b = q32 / (K.T @ a)

    return timeit(run, repeat=repeat).best / iters


def pot_per_iteration(M, p, q, eps, n1: int, n2: int, repeat: int) -> float:
    """POT's sinkhorn_knopp: (t(n2) - t(n1)) / (n2 - n1), best of ``repeat`` each."""

    def run(n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ot.sinkhorn(p, q, M, eps, numItermax=n, stopThr=0.0)

    t1 = timeit(lambda: run(n1), repeat=repeat, warmup=0).best
    gc.collect()
    t2 = timeit(lambda: run(n2), repeat=repeat, warmup=0).best
    gc.collect()
    return (t2 - t1) / (n2 - n1)


def pot_to_tolerance(M, p, q, eps, tol: float, max_iter: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        plan, log = ot.sinkhorn(p, q, M, eps, numItermax=max_iter, stopThr=tol, log=True)
        seconds = time.perf_counter() - t0
    column_l1 = float(np.abs(plan.sum(axis=0, dtype=np.float64) - q).sum())
    del plan
    return {"seconds": seconds, "n_iter": int(log["niter"]) + 1, "final_l2_err": float(log["err"][-1]),
            "column_l1_err": column_l1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--spots", type=int, default=3_600)
    ap.add_argument("--lam", type=float, default=0.05, help="eps = lam * max D (kernel domain needs lam >= 0.02)")
    ap.add_argument("--iters", type=int, default=50, help="iterations per timed run")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (best is kept)")
    ap.add_argument("--block-rows", type=int, nargs="+", default=[2048, 4096, 12_500, 25_000])
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=2000)
    ap.add_argument("--bandwidth-gib", type=float, default=2.0, help="array size of the bandwidth reader")
    ap.add_argument("--no-pot64", action="store_true", help="skip POT on a float64 cost")
    ap.add_argument("--cost", choices=["random", "geometric"], default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernel-dtypes", nargs="*", default=["float16", "bfloat16"],
                    help="16-bit kernel storages timed at the best float32 block size")
    ap.add_argument("--zarr", action="store_true",
                    help="also time the kernel in a Zarr kernel store (float32 and --kernel-dtypes), from the page cache")
    ap.add_argument("--pot-cost-on-disk", action="store_true", help="memory-map POT's cost from benchmarks/_work")
    ap.add_argument("--pot-cells", type=int, default=None,
                    help="time POT on the first rows only (it holds ~4 copies of the matrix); its per-iteration "
                         "time is then scaled by cells / pot_cells and reported as such")
    ap.add_argument("--name", default="sinkhorn", help="results/<name>.json")
    args = ap.parse_args()
    load_before = loadavg()
    (RESULTS_DIR / args.name).parent.mkdir(parents=True, exist_ok=True)
    threads = __import__("os").cpu_count() or 1

    with PeakMemory() as mem:
        bw = measure_bandwidth(int(args.bandwidth_gib * 2**30))
        K, p, q, eps = make_problem(args.cells, args.spots, args.lam, args.seed, args.cost)
        bound = K.nbytes / (bw["best_gbs"] * 1e9)

        ours = [ours_per_iteration(K, p, q, eps, br, args.iters, args.repeat) for br in args.block_rows]
        best = min(ours, key=lambda r: r["per_iter_s"])
        half = {dtype: ours_per_iteration(K, p, q, eps, best["block_rows"], args.iters, args.repeat, dtype)
                for dtype in args.kernel_dtypes}
        zarr = {dtype: ours_per_iteration(K, p, q, eps, best["block_rows"], args.iters, args.repeat, dtype, "zarr")
                for dtype in (["float32", *args.kernel_dtypes] if args.zarr else [])}
        gc.collect()
        no_dask = bare_sweep(K, p, q, eps, best["block_rows"], args.iters, args.repeat, threads)
        np_iter = numpy_two_pass(K, p, q, args.iters, args.repeat)

        kernel = kernel_from_array(K, eps=eps, block_rows=best["block_rows"], max_cost=1.0)
        t0 = time.perf_counter()
        res = sinkhorn(kernel, p, q, tol=args.tol, max_iter=args.max_iter)
        ours_tol = {"seconds": time.perf_counter() - t0, "n_iter": res.n_iter, "column_l1_err": res.marginal_error,
                    "converged": res.converged, "block_rows": best["block_rows"]}
        del kernel
        kernel_bytes = K.nbytes
        np.log(K, out=K)  # K becomes POT's cost M = -eps log K, in place
        K *= np.float32(-eps)
        M32, K = K, None
        pot_rows = min(args.pot_cells or args.cells, args.cells)
        pot_scale = args.cells / pot_rows  # POT's per-iteration work is proportional to the rows
        M32 = M32[:pot_rows]
        p_pot = p[:pot_rows] / p[:pot_rows].sum()
        if args.pot_cost_on_disk:
            WORK_DIR.mkdir(parents=True, exist_ok=True)
            np.save(WORK_DIR / "pot_cost.npy", M32)
            M32 = np.load(WORK_DIR / "pot_cost.npy", mmap_mode="r")
        pot32 = pot_scale * pot_per_iteration(M32, p_pot.astype(np.float32), q.astype(np.float32), eps, 10,
                                              10 + 4 * args.iters, args.repeat)
        pot32_tol = pot_to_tolerance(M32, p_pot.astype(np.float32), q.astype(np.float32), eps, args.tol, args.max_iter)
        pot64 = pot64_tol = None
        if not args.no_pot64:
            M64 = M32.astype(np.float64)
            del M32
            pot64 = pot_scale * pot_per_iteration(M64, p_pot, q, eps, 10, 10 + 2 * args.iters, max(1, args.repeat - 1))
            pot64_tol = pot_to_tolerance(M64, p_pot, q, eps, args.tol, args.max_iter)
            del M64
        else:
            del M32
        gc.collect()
        (WORK_DIR / "pot_cost.npy").unlink(missing_ok=True)

    rows = [
        ["memory-bandwidth bound", bound * 1e3, 1.0, f"{bw['best_gbs']:.1f} GB/s ({bw['best_method']})"],
        *[[f"ssa_dask sinkhorn, block_rows={r['block_rows']} ({r['n_blocks']} blocks)", r["per_iter_s"] * 1e3,
           r["per_iter_s"] / bound, "fused one-pass Numba sweep, local executor"] for r in ours],
        [f"same sweep, bare thread pool (block_rows={best['block_rows']})", no_dask * 1e3, no_dask / bound, "ThreadPool"],
        ["NumPy two-pass (sgemv x2)", np_iter * 1e3, np_iter / bound, "float32"],
        *[[f"ssa_dask sinkhorn, {dtype} kernel (block_rows={r['block_rows']})", r["per_iter_s"] * 1e3,
           r["per_iter_s"] / bound, "2 bytes/entry, decoded in the sweep"] for dtype, r in half.items()],
        *[[f"ssa_dask sinkhorn, {dtype} kernel in a Zarr store", r["per_iter_s"] * 1e3, r["per_iter_s"] / bound,
           "chunks memory-mapped (page cache)"] for dtype, r in zarr.items()],
        ["POT ot.sinkhorn float32", pot32 * 1e3, pot32 / bound,
         "per-iteration by differencing" + (f", on {pot_rows:,} rows x {pot_scale:.3g}" if pot_scale != 1 else "")],
    ]
    if pot64 is not None:
        rows.append(["POT ot.sinkhorn float64", pot64 * 1e3, pot64 / bound, "K is 2x the bytes"])
    print(f"K: {args.cells:,} x {args.spots:,} float32 = {kernel_bytes / 1e9:.2f} GB, eps = {eps:.4g}, "
          f"{threads} cores, load {load_before}")
    print_table("Per iteration", ["method", "ms/iter", "x bound", "note"], rows)
    ratios = {
        "ours_over_bound": best["per_iter_s"] / bound,
        "pot32_over_ours": pot32 / best["per_iter_s"],
        "pot64_over_ours": (pot64 / best["per_iter_s"]) if pot64 else None,
        "numpy_over_ours": np_iter / best["per_iter_s"],
        "ours_over_bare_pool": best["per_iter_s"] / no_dask,
        "pot32_total_over_ours_total": pot32_tol["seconds"] / ours_tol["seconds"] if pot_scale == 1 else None,
        **{f"{dtype}_over_bound": r["per_iter_s"] / bound for dtype, r in half.items()},
        **{f"{dtype}_over_float32": r["per_iter_s"] / best["per_iter_s"] for dtype, r in half.items()},
        **{f"pot32_over_{dtype}": pot32 / r["per_iter_s"] for dtype, r in half.items()},
        **{f"zarr_{dtype}_over_bound": r["per_iter_s"] / bound for dtype, r in zarr.items()},
        "pot64_total_over_ours_total": (pot64_tol["seconds"] / ours_tol["seconds"]) if pot64_tol and pot_scale == 1 else None,
    }
    tol_rows = [["ssa_dask", ours_tol["seconds"], ours_tol["n_iter"], ours_tol["column_l1_err"]],
                [f"POT float32 ({pot_rows:,} rows)", pot32_tol["seconds"], pot32_tol["n_iter"], pot32_tol["column_l1_err"]]]
    if pot64_tol:
        tol_rows.append(["POT float64", pot64_tol["seconds"], pot64_tol["n_iter"], pot64_tol["column_l1_err"]])
    print_table(f"To tolerance {args.tol:g}", ["method", "seconds", "iterations", "final column L1 error"], tol_rows)
    print_table("Ratios (same run)", ["ratio", "value"], [[k, v] for k, v in ratios.items() if v is not None])
    print(f"peak RSS {mem.peak_gib:.2f} GiB")
    write_result(args.name, {
        "args": vars(args), "eps": eps, "kernel_bytes": kernel_bytes, "bandwidth": bw, "bound_s": bound,
        "ours": ours, "ours_16_bit": half, "ours_zarr": zarr, "pot_rows": pot_rows, "ours_bare_pool_s": no_dask, "numpy_two_pass_s": np_iter, "pot32_s": pot32, "pot64_s": pot64,
        "ours_to_tol": ours_tol, "pot32_to_tol": pot32_tol, "pot64_to_tol": pot64_tol, "ratios": ratios,
        "peak_rss_gib": mem.peak_gib,
    }, load_before)


if __name__ == "__main__":
    main()
