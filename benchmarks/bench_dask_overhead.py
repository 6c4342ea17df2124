"""Dask overhead of one Sinkhorn iteration: scheduler time against kernel-sweep compute time.

The same kernel blocks (``cells x spots`` float32, ``block_rows`` rows each) are swept by:

* **no Dask**: the compiled Numba sweep (``ssa_dask.kernel._sweeps.kernel_sweep``) on each block from a
  plain thread pool with as many threads as cores: the compute floor;
* **local executor**: ssa_dask's Sinkhorn loop (:func:`ssa_dask.sinkhorn.sinkhorn`) with
  ``Executor()`` (what ``align(client=None)`` uses: a thread pool, no task graph);
* **Dask threads scheduler**: the same per-block function as one Dask graph per iteration,
  ``dask.compute(..., scheduler="threads")``;
* **distributed**: ssa_dask's Sinkhorn loop on a ``LocalCluster`` with 1, 2 and 4 worker
  processes (``Executor(client)``: one ``client.map`` task per worker thread per iteration),
  blocks generated and held on the workers.

For distributed runs, the task stream gives each task's compute time; ``compute share`` =
summed compute time / (wall time x threads), and ``overhead/iter`` = wall per iteration minus the
no-Dask time per iteration.

**Overhead over the local executor** (issue 13's measure, target ``TARGET_MS``): the machine is
shared, so each distributed run is paired with a local-executor run of the same iterations just
before it, in the same process, and the overhead is the median over ``--repeat + 1`` pairs of
(distributed - local) seconds per iteration.  ``sweep tasks/iter`` counts the per-iteration tasks
in the scheduler's task stream (it should be the number of worker threads).  Since wall times
on a shared machine mostly measure the other jobs, the CPU time that Dask itself spends per
iteration is reported too: in the event-loop thread that runs the LocalCluster's scheduler and
the client (this process), and in the worker and nanny processes (the sweeps included, which cost
the same CPU time however they are scheduled).  The same run times an *empty* round trip (as many
no-op tasks as worker threads, ``client.map`` + ``gather``, no dependencies, no data): the floor
of any design with one round trip per iteration on this cluster.  On a 2-core machine the
scheduler, the client and the workers share the two cores, so the scheduler's CPU time per
iteration is taken from the sweeps; on a cluster the scheduler has its own machine.

Usage::

    python benchmarks/bench_dask_overhead.py                       # 50,000 x 3,600, 4,096-row blocks
    python benchmarks/bench_dask_overhead.py --cells 20000 --workers 1 2 --block-rows 2048
    python benchmarks/bench_dask_overhead.py --cells 200000 --spots 4000 --workers 2 --name dask_overhead_200k
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import dask.array as da
import numpy as np
import psutil

from _common import PeakMemory, loadavg, print_table, write_result
from ssa_dask.kernel import _sweeps
from ssa_dask.cluster import Executor
from ssa_dask.errors import ConvergenceWarning
from ssa_dask.kernel._block_math import column_marginal_block as _column_marginal_block
from ssa_dask.kernel._block_math import scaling as _scaling
from ssa_dask.kernel import Kernel
from ssa_dask.kernel.storage import MemoryBlocks
from ssa_dask.sinkhorn import sinkhorn

EPS = 0.05
#: Issue 13's target: distributed seconds per iteration at most this many ms above the local executor's.
TARGET_MS = 15.0


def _block(block_id: int, rows: int, n_spots: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, block_id])
    D = rng.random((rows, n_spots), dtype=np.float32)
    return np.exp(D * np.float32(-1.0 / EPS))


def lazy_blocks(n_cells: int, n_spots: int, block_rows: int, seed: int) -> da.Array:
    """Kernel row blocks ``exp(-D/eps)`` of a uniform random ``D``, generated where they are computed."""
    starts = list(range(0, n_cells, block_rows))
    sizes = [min(block_rows, n_cells - s) for s in starts]
    return da.map_blocks(
        lambda block_info=None: _block(block_info[None]["chunk-location"][0], block_info[None]["chunk-shape"][0],
                                       n_spots, seed),
        dtype=np.float32, chunks=(tuple(sizes), (n_spots,)), meta=np.empty((0, 0), np.float32),
    )


def marginals(n_cells: int, n_spots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    p, q = rng.uniform(0.5, 1.5, n_cells), rng.uniform(0.5, 1.5, n_spots)
    return p / p.sum(), q / q.sum()


def make_kernel(blocks: list, block_rows: int, n_cells: int, n_spots: int) -> Kernel:
    bounds = np.append(np.arange(0, n_cells, block_rows), n_cells)
    return Kernel(MemoryBlocks(blocks, bounds, n_spots), eps=EPS, log_domain=False, max_cost=1.0)


def dask_threads(blocks: list[np.ndarray], p: np.ndarray, q: np.ndarray, iters: int, repeat: int) -> float:
    """One Dask graph (a task per block + a sum) per iteration on the threaded scheduler."""
    import dask

    starts = np.cumsum([0] + [b.shape[0] for b in blocks])
    pb = [p[a:b] for a, b in zip(starts[:-1], starts[1:])]
    best = np.inf
    for _ in range(repeat + 1):
        g = np.zeros(blocks[0].shape[1])
        t0 = time.perf_counter()
        for _ in range(iters):
            parts = [dask.delayed(_column_marginal_block)(blk, r, g, EPS, False) for blk, r in zip(blocks, pb)]
            (column,) = dask.compute(dask.delayed(sum)(parts), scheduler="threads")
            g = g + EPS * (np.log(q) - np.log(column))
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def run_sinkhorn(kernel: Kernel, p, q, iters: int, repeat: int, executor: Executor) -> float:
    """Best seconds per iteration of ``sinkhorn`` with a fixed iteration count."""
    best = np.inf
    for _ in range(repeat + 1):  # first run warms up (compilation, worker imports)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = sinkhorn(kernel, p, q, tol=1e-300, max_iter=iters, executor=executor)
        best = min(best, res.seconds / iters)
    return best


def no_dask(blocks: list[np.ndarray], p: np.ndarray, q: np.ndarray, iters: int, repeat: int, threads: int) -> float:
    starts = np.cumsum([0] + [b.shape[0] for b in blocks])
    pb = [np.ascontiguousarray(p[a:b]) for a, b in zip(starts[:-1], starts[1:])]
    n_spots = blocks[0].shape[1]

    def sweep(args):
        block, rows, b = args
        out = np.zeros(n_spots)
        _sweeps.kernel_sweep(block, rows, b, out)
        return out

    best = np.inf
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeat + 1):
            g = np.zeros(n_spots)
            t0 = time.perf_counter()
            for _ in range(iters):
                b = _scaling(g, EPS).astype(np.float32)
                column = np.sum(list(pool.map(sweep, [(blk, r, b) for blk, r in zip(blocks, pb)])), axis=0)
                g = g + EPS * (np.log(q) - np.log(column))
            best = min(best, (time.perf_counter() - t0) / iters)
    return best


def distributed_run(n_workers: int, args, p, q, local_kernel: Kernel) -> dict:
    from distributed import Client, LocalCluster, get_task_stream

    cores = os.cpu_count() or 1
    threads = max(1, cores // n_workers)
    with LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True, dashboard_address=None,
                      memory_limit="auto") as cluster, Client(cluster) as client:
        executor = Executor(client)
        blocks = executor.materialize_blocks(lazy_blocks(args.cells, args.spots, args.block_rows, args.seed))
        kernel = make_kernel(blocks, args.block_rows, args.cells, args.spots)
        p_blocks = kernel.row_vector(p, executor)  # held on the workers once, as align does
        per_iter = run_sinkhorn(kernel, p_blocks, q, args.iters, 0, executor)  # warm-up inside (repeat + 1 = 1 run)
        local_executor = Executor()
        pairs = [(run_sinkhorn(local_kernel, p, q, args.iters, 0, local_executor),
                  run_sinkhorn(kernel, p_blocks, q, args.iters, 0, executor)) for _ in range(args.repeat + 1)]
        local_executor.close()
        per_iter = min(per_iter, *(there for _, there in pairs))
        loop_thread = client.run_on_scheduler(_native_thread_id)  # the scheduler's and the client's event loop
        workers = psutil.Process().children(recursive=True)  # workers and nannies
        loop_before, workers_before = _thread_cpu_seconds(loop_thread), sum(map(_cpu_seconds, workers))
        with get_task_stream(client) as ts:
            t0 = time.perf_counter()
            per_iter = min(per_iter, run_sinkhorn(kernel, p_blocks, q, args.iters, 0, executor))
            wall = time.perf_counter() - t0
        loop_cpu = _thread_cpu_seconds(loop_thread) - loop_before
        workers_cpu = sum(map(_cpu_seconds, workers)) - workers_before
        floor = round_trip_floor(client, n_workers * threads, loop_thread, workers, args.iters)
        compute = sum(ss["stop"] - ss["start"] for task in ts.data for ss in task["startstops"]
                      if ss["action"] == "compute")
        transfer = sum(ss["stop"] - ss["start"] for task in ts.data for ss in task["startstops"]
                       if ss["action"] == "transfer")
        n_tasks = len(ts.data)
        sweeps = sum("_run_group" in str(task["key"]) for task in ts.data)
        overhead = float(np.median([there - here for here, there in pairs]))
        return {"workers": n_workers, "threads_per_worker": threads, "per_iter_s": per_iter, "stream_wall_s": wall,
                "task_compute_s": compute, "task_transfer_s": transfer, "tasks": n_tasks,
                "tasks_per_iter": n_tasks / args.iters,  # the recorded window holds one sinkhorn call
                "sweep_tasks_per_iter": sweeps / args.iters,
                "paired_s_per_iter": [{"local": here, "distributed": there} for here, there in pairs],
                "overhead_vs_local_s": overhead,
                "scheduler_client_cpu_s_per_iter": loop_cpu / args.iters,
                "workers_cpu_s_per_iter": workers_cpu / args.iters,
                "empty_round_trip": floor,
                "compute_share": compute / (wall * n_workers * threads)}


def _empty_task(index: int) -> None:
    return None


def round_trip_floor(client, n_tasks: int, loop_thread: int, workers: list, iters: int) -> dict:
    """Wall and CPU seconds of ``iters`` empty ``client.map`` + ``gather`` round trips of ``n_tasks`` tasks.

    The least any design with one round trip per iteration pays on this cluster (no dependencies,
    no data), measured on the same processes as the Sinkhorn runs.
    """
    for _ in range(3):
        client.gather(client.map(_empty_task, range(n_tasks), pure=False))
    loop_before, workers_before = _thread_cpu_seconds(loop_thread), sum(map(_cpu_seconds, workers))
    t0 = time.perf_counter()
    for _ in range(iters):
        client.gather(client.map(_empty_task, range(n_tasks), pure=False))
    return {"wall_s": (time.perf_counter() - t0) / iters,
            "scheduler_client_cpu_s": (_thread_cpu_seconds(loop_thread) - loop_before) / iters,
            "workers_cpu_s": (sum(map(_cpu_seconds, workers)) - workers_before) / iters}


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _native_thread_id() -> int:
    return threading.get_native_id()


def _thread_cpu_seconds(native_id: int) -> float:
    """CPU seconds of one thread of this process (the event loop that runs the scheduler and client)."""
    return next(t.user_time + t.system_time for t in psutil.Process().threads() if t.id == native_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--spots", type=int, default=3_600)
    ap.add_argument("--block-rows", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="dask_overhead")
    args = ap.parse_args()
    load_before = loadavg()
    threads = os.cpu_count() or 1
    p, q = marginals(args.cells, args.spots, args.seed)

    with PeakMemory() as mem:
        lazy = lazy_blocks(args.cells, args.spots, args.block_rows, args.seed)
        local = [np.asarray(b) for b in __import__("dask").compute(*lazy.to_delayed().ravel(), scheduler="threads")]
        floor = no_dask(local, p, q, args.iters, args.repeat, threads)
        executor = Executor()
        local_kernel = make_kernel(local, args.block_rows, args.cells, args.spots)
        local_exec = run_sinkhorn(local_kernel, p, q, args.iters, args.repeat, executor)
        executor.close()
        thr = dask_threads(local, p, q, args.iters, args.repeat)
        dist = [distributed_run(w, args, p, q, local_kernel) for w in args.workers]
        del local, local_kernel

    n_blocks = -(-args.cells // args.block_rows)
    rows = [["no Dask (ThreadPool, Numba sweep)", threads, floor * 1e3, 0.0, 1.0, "-"],
            ["ssa_dask local executor (align, client=None)", threads, local_exec * 1e3, (local_exec - floor) * 1e3,
             local_exec / floor, "-"],
            ["Dask threads scheduler (graph per iteration)", threads, thr * 1e3, (thr - floor) * 1e3, thr / floor, "-"]]
    for d in dist:
        rows.append([f"distributed, {d['workers']} worker(s) x {d['threads_per_worker']} thread(s)",
                     d["workers"] * d["threads_per_worker"], d["per_iter_s"] * 1e3, (d["per_iter_s"] - floor) * 1e3,
                     d["per_iter_s"] / floor, f"{d['compute_share']:.2f}"])
    print(f"K {args.cells:,} x {args.spots:,} float32 ({args.cells * args.spots * 4 / 1e9:.2f} GB), {n_blocks} blocks "
          f"of {args.block_rows} rows, {threads} cores, load {load_before}")
    print_table("Seconds per Sinkhorn iteration", ["executor", "threads", "ms/iter", "overhead ms/iter", "x no-Dask",
                                                   "compute share"], rows)
    print_table(f"Distributed overhead over the local executor (median of {args.repeat + 1} paired runs; "
                f"target <= {TARGET_MS:g} ms)", ["executor", "local ms/iter", "distributed ms/iter",
                                                  "overhead ms/iter", "target met", "sweep tasks/iter",
                                                  "scheduler+client CPU ms/iter", "workers CPU ms/iter",
                                                  "empty round trip ms (its CPU: scheduler+client / workers)"],
                [[f"{d['workers']} worker(s) x {d['threads_per_worker']} thread(s)",
                  np.median([pair["local"] for pair in d["paired_s_per_iter"]]) * 1e3,
                  np.median([pair["distributed"] for pair in d["paired_s_per_iter"]]) * 1e3,
                  d["overhead_vs_local_s"] * 1e3, "yes" if d["overhead_vs_local_s"] * 1e3 <= TARGET_MS else "no",
                  f"{d['sweep_tasks_per_iter']:g}", d["scheduler_client_cpu_s_per_iter"] * 1e3,
                  d["workers_cpu_s_per_iter"] * 1e3,
                  f"{d['empty_round_trip']['wall_s'] * 1e3:.1f} ({d['empty_round_trip']['scheduler_client_cpu_s'] * 1e3:.1f}"
                  f" / {d['empty_round_trip']['workers_cpu_s'] * 1e3:.1f})"] for d in dist])
    print(f"peak RSS (this process; workers are separate processes) {mem.peak_gib:.2f} GiB")
    write_result(args.name, {"args": vars(args), "n_blocks": n_blocks, "no_dask_s": floor,
                             "local_executor_s": local_exec, "dask_threads_s": thr,
                             "distributed": dist, "target_overhead_ms": TARGET_MS, "peak_rss_gib": mem.peak_gib},
                 load_before)


if __name__ == "__main__":
    main()
