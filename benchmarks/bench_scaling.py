"""End-to-end scaling of ``ssa_dask.align`` on synthetic AnnData-on-Zarr data (ssa_dask.evaluation.synth).

For each size ``N`` (cells) the synthetic data set ``N x G`` cells and ``S x G`` spots is written
once under ``benchmarks/_work/`` (skipped when already there), then ``align`` runs in a **fresh
subprocess** reading the Zarr stores lazily. The parent samples the summed RSS of the child and
all its descendants (peak), and the child reports its wall time, storage I/O (``/proc`` io
counters: ``read_bytes``/``write_bytes`` reached the block device, ``*_chars`` include page-cache
hits), iterations, where the kernel lived, the timeline of ``ssa_dask`` log messages, and the
accuracy against the synthetic truth (``obs["true_spot"]``, ``obs["domain"]``).

``--spots`` takes several sizes (spots as a second scaling axis, e.g. ``--spots 4000 20000 100000``);
``--kernel-dtype`` and ``--kernel`` (``dense`` or ``multiscale``, with ``--n-support``) pick the
kernel.  Each run reports where its time went, from the ``ssa_dask`` log timeline: reading and
per-gene statistics up to the gene selection, the kernel (cost GEMM, ``exp``, storing; a 16-bit
kernel computes the cost twice; the multiscale kernel clusters the spots and finds each cell's
support), the Sinkhorn iterations, and the assignment (top-k pass) with the output.

``--check-storage N`` also aligns the first ``N`` cells twice, kernel in memory and kernel in a
Zarr store streamed every iteration, and compares the assignments.

Usage::

    python benchmarks/bench_scaling.py                                  # 10k, 30k, 100k cells
    python benchmarks/bench_scaling.py --sizes 300000 --name scaling_300k
    python benchmarks/bench_scaling.py --sizes 1000000 --name scaling_1m  # ~1 h, 16 GB kernel on disk
    python benchmarks/bench_scaling.py --sizes --check-storage 50000 --name storage_check
    python benchmarks/bench_scaling.py --sizes 100000 1000000 --synth-only --name synth  # generator only
    python benchmarks/bench_scaling.py --sizes 100000 --spots 4000 20000 --genes 500 --kernel-dtype float16 \
        --name scaling_spots_dense                                       # spots as the axis
    python benchmarks/bench_scaling.py --sizes 1000000 --spots 20000 --genes 500 --kernel-dtype float16 \
        --storage zarr --name scaling_1m_x_20k                           # 40 GB float16 kernel streamed from Zarr
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from _common import WORK_DIR, io_bytes, loadavg, print_table, run_child, write_result


# ----------------------------------------------------------------------------- children
def _synth_child(args: argparse.Namespace) -> None:
    from ssa_dask.evaluation.synth import SynthParams, write_synth

    params = SynthParams(n_cells=args.cells, n_genes=args.genes, n_spots=args.spots[0], density=args.density,
                         seed=args.seed)
    t0 = time.perf_counter()
    write_synth(args.data, params, chunk_rows=args.chunk_rows, overwrite=True)
    result = {"seconds": time.perf_counter() - t0, "io": io_bytes()}
    Path(args.result).write_text(json.dumps(result))


class _Timeline(logging.Handler):
    def __init__(self, start: float) -> None:
        super().__init__(logging.INFO)
        self.start = start
        self.events: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((round(time.perf_counter() - self.start, 3), record.getMessage()))


def _align_child(args: argparse.Namespace) -> None:
    import anndata as ad
    import zarr

    import ssa_dask

    start = time.perf_counter()
    timeline = _Timeline(start)
    logger = logging.getLogger("ssa_dask")
    logger.setLevel(logging.INFO)
    logger.addHandler(timeline)
    logger.addHandler(logging.StreamHandler(sys.stderr))
    data = Path(args.data)
    kwargs = {"kernel_storage": args.storage, "tol": args.tol, "max_iter": args.max_iter}
    if args.kernel_path:
        kwargs["kernel_path"] = args.kernel_path
    if args.block_rows:
        kwargs["block_rows"] = args.block_rows
    kwargs.update(kernel_dtype=args.kernel_dtype, kernel=args.kernel)
    if args.n_support:
        kwargs["n_support"] = args.n_support
    io0 = io_bytes()
    ds = ssa_dask.align(str(data / "cells.zarr"), str(data / "spots.zarr"), **kwargs)
    seconds = time.perf_counter() - start
    io1 = io_bytes()

    obs = ad.io.read_elem(zarr.open_group(str(data / "cells.zarr"), mode="r")["obs"])
    spot_obs = ad.io.read_elem(zarr.open_group(str(data / "spots.zarr"), mode="r")["obs"])
    spot = ds["spot"].to_numpy()
    true_spot = obs["true_spot"].to_numpy()
    dist = np.hypot(spot_obs["x"].to_numpy()[spot] - obs["x"].to_numpy(), spot_obs["y"].to_numpy()[spot] - obs["y"].to_numpy())
    result = {
        "seconds": seconds,
        "io": {k: io1[k] - io0[k] for k in io1},
        "n_cells": int(ds.sizes["cell"]),
        "attrs": {k: v for k, v in ds.attrs.items() if k != "column_potential" and not isinstance(v, (list, np.ndarray))},
        "timeline": timeline.events,
        "stages": stage_seconds(timeline.events, seconds, ds.attrs["sinkhorn_seconds"]),
        "accuracy": {
            "true_spot": float((spot == true_spot).mean()),
            "domain": float((spot_obs["domain"].to_numpy()[spot] == obs["domain"].to_numpy()).mean()),
            "median_distance": float(np.median(dist)),
        },
    }
    np.save(args.result + ".spot.npy", spot)
    np.save(args.result + ".prob.npy", ds["probability"].to_numpy())
    Path(args.result).write_text(json.dumps(result, default=float))


def stage_seconds(events: list[tuple[float, str]], total: float, sinkhorn: float) -> dict[str, float]:
    """Seconds per stage of one ``align`` run, from its log timeline (``(seconds, message)`` pairs).

    ``read + statistics``: start to the gene selection's message (the pass over the inputs);
    ``kernel``: from there to the start of the Sinkhorn iterations; ``sinkhorn``: the solver's own
    time; ``assignment + output``: the rest (top-k pass, the result dataset).
    """
    selected = next(t for t, message in events if message.startswith("using "))
    solved = next(t for t, message in events if message.startswith("Sinkhorn: "))
    return {"read + statistics": selected, "kernel": solved - sinkhorn - selected, "sinkhorn": sinkhorn,
            "assignment + output": total - solved}


# ----------------------------------------------------------------------------- parent
def _run_child(argv: list[str], result: Path, log: Path) -> dict:
    """Run this script as a child (see ``_common.run_child``)."""
    return run_child(__file__, argv, result, log, interval=0.2)


def _data_dir(args: argparse.Namespace, n: int, spots: int) -> Path:
    return WORK_DIR / f"synth_{n}x{args.genes}_s{spots}_d{args.density:g}_seed{args.seed}"


def ensure_data(args: argparse.Namespace, n: int, spots: int) -> tuple[Path, dict | None]:
    """Write the synthetic data set for ``n`` cells and ``spots`` spots unless a complete one is there."""
    data = _data_dir(args, n, spots)
    if (data / "synth.json").exists() and (data / "spots.zarr").exists():
        return data, None
    argv = ["--synth-child", "--data", str(data), "--cells", str(n), "--genes", str(args.genes), "--spots",
            str(spots), "--density", str(args.density), "--seed", str(args.seed), "--chunk-rows", str(args.chunk_rows)]
    info = _run_child(argv, WORK_DIR / f"synth_{n}x{spots}.json", WORK_DIR / "logs" / f"synth_{n}x{spots}.log")
    print(f"  synth {n:,} cells x {spots:,} spots: {info['seconds']:.1f} s, peak RSS {info['peak_rss_gib']:.2f} GiB")
    return data, info


def run_align(args: argparse.Namespace, data: Path, tag: str, storage: str) -> dict:
    kernel_path = WORK_DIR / "kernels" / f"{tag}.zarr"
    if kernel_path.exists():
        shutil.rmtree(kernel_path)
    kernel_path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["--align-child", "--data", str(data), "--storage", storage, "--tol", str(args.tol),
            "--max-iter", str(args.max_iter), "--kernel-path", str(kernel_path), "--kernel-dtype", args.kernel_dtype,
            "--kernel", args.kernel, *(["--n-support", str(args.n_support)] if args.n_support else [])]
    if args.block_rows:
        argv += ["--block-rows", str(args.block_rows)]
    try:
        return _run_child(argv, WORK_DIR / f"align_{tag}.json", WORK_DIR / "logs" / f"align_{tag}.log")
    finally:
        shutil.rmtree(kernel_path, ignore_errors=True)


def _fit_exponent(ns: list[int], ts: list[float]) -> float | None:
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 30_000, 100_000])
    ap.add_argument("--spots", type=int, nargs="+", default=[4000], help="spot counts (a second scaling axis)")
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-rows", type=int, default=10_000)
    ap.add_argument("--storage", default="auto", choices=["auto", "memory", "zarr"])
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=2000)
    ap.add_argument("--block-rows", type=int, default=None)
    ap.add_argument("--kernel-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--kernel", default="dense", choices=["dense", "multiscale"])
    ap.add_argument("--n-support", type=int, default=None,
                    help="spots per cell of the multiscale kernel (default: align's)")
    ap.add_argument("--check-storage", type=int, default=0, metavar="N",
                    help="also compare kernel in memory vs in Zarr on the first N cells")
    ap.add_argument("--synth-only", action="store_true",
                    help="only write the synthetic data sets (timed, peak RSS), no align")
    ap.add_argument("--name", default="scaling")
    # internal: child modes
    ap.add_argument("--synth-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--align-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cells", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--kernel-path", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.synth_child:
        return _synth_child(args)
    if args.align_child:
        return _align_child(args)

    (WORK_DIR / "logs").mkdir(parents=True, exist_ok=True)
    load_before = loadavg()
    runs = []
    if args.synth_only:
        synth_runs = []
        for n in args.sizes:
            for spots in args.spots:
                data = _data_dir(args, n, spots)
                if data.exists():
                    shutil.rmtree(data)
                _, info = ensure_data(args, n, spots)
                size = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
                synth_runs.append({"cells": n, "spots": spots, **info, "bytes_on_disk": size})
        print_table("ssa_dask.evaluation.synth.write_synth",
                    ["cells", "spots", "seconds", "peak RSS GiB", "GB on disk", "chunk rows"],
                    [[f"{r['cells']:,}", f"{r['spots']:,}", r["seconds"], r["peak_rss_gib"], r["bytes_on_disk"] / 1e9,
                      args.chunk_rows] for r in synth_runs])
        write_result(args.name, {"args": vars(args), "synth": synth_runs}, load_before)
        return None
    for n in args.sizes:
        for spots in args.spots:
            data, synth = ensure_data(args, n, spots)
            print(f"  align {n:,} cells x {spots:,} spots ...", flush=True)
            res = run_align(args, data, f"{n}x{spots}_{args.storage}", args.storage)
            res.update({"cells": n, "spots": spots, "synth": synth, "loadavg_after": loadavg()})
            runs.append(res)
            print(f"  align {n:,} x {spots:,}: {res['seconds']:.1f} s, peak RSS {res['peak_rss_gib']:.2f} GiB, "
                  f"{res['attrs'].get('n_iter')} iterations, kernel {res['attrs'].get('kernel_dtype')} in "
                  f"{res['attrs'].get('kernel_storage')}", flush=True)

    check = None
    if args.check_storage:
        n = args.check_storage
        data, _ = ensure_data(args, n, args.spots[0])
        both = {s: run_align(args, data, f"{n}_check_{s}", s) for s in ("memory", "zarr")}
        tags = {s: WORK_DIR / f"align_{n}_check_{s}.json" for s in both}
        spot = {s: np.load(str(tags[s]) + ".spot.npy") for s in both}
        prob = {s: np.load(str(tags[s]) + ".prob.npy") for s in both}
        check = {
            "cells": n,
            "identical_assignments": int((spot["memory"] == spot["zarr"]).sum()),
            "all_identical": bool(np.array_equal(spot["memory"], spot["zarr"])),
            "max_probability_difference": float(np.abs(prob["memory"] - prob["zarr"]).max()),
            "n_iter": {s: both[s]["attrs"].get("n_iter") for s in both},
            "seconds": {s: both[s]["seconds"] for s in both},
            "peak_rss_gib": {s: both[s]["peak_rss_gib"] for s in both},
            "io": {s: both[s]["io"] for s in both},
        }

    table = []
    for r in runs:
        a = r["attrs"]
        it = a.get("n_iter") or 0
        table.append([f"{r['cells']:,}", f"{r['spots']:,}", r["seconds"], r["peak_rss_gib"],
                      (r["io"]["read_bytes"]) / 1e9, r["io"]["read_chars"] / 1e9, r["io"]["write_bytes"] / 1e9, it,
                      (a.get("sinkhorn_seconds") or 0) / max(it, 1), f"{a.get('kernel_dtype')} {a.get('kernel_storage')}",
                      a.get("converged"), r["accuracy"]["domain"]])
    print_table(f"align: cells x spots x {args.genes:,} genes (density {args.density:g}), load {load_before}",
                ["cells", "spots", "wall s", "peak RSS GiB", "disk read GB", "read() GB", "disk write GB", "iters",
                 "s/iter", "K", "converged", "domain acc"], table)
    stage_names = list(runs[0]["stages"]) if runs else []
    print_table("where the time goes (seconds; share of the run)", ["cells", "spots", *stage_names],
                [[f"{r['cells']:,}", f"{r['spots']:,}",
                  *(f"{r['stages'][k]:.1f} ({r['stages'][k] / r['seconds']:.0%})" for k in stage_names)] for r in runs])
    exponents = {}
    for axis, other in (("cells", "spots"), ("spots", "cells")):
        for fixed in sorted({r[other] for r in runs}):
            along = [r for r in runs if r[other] == fixed]
            exponent = _fit_exponent([r[axis] for r in along], [r["seconds"] for r in along])
            if exponent is not None:
                exponents[f"{axis} at {fixed} {other}"] = exponent
                print(f"time ~ {axis}^{exponent:.2f} at {fixed:,} {other} (log-log fit; 1.00 = linear)")
    if check:
        print_table(f"Kernel in memory vs in Zarr, {check['cells']:,} cells", ["check", "value"],
                    [[k, v] for k, v in check.items() if k != "io"])
    write_result(args.name, {"args": vars(args), "runs": runs, "time_exponents": exponents, "storage_check": check},
                 load_before)


if __name__ == "__main__":
    main()
