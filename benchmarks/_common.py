"""Shared helpers of the benchmarks: memory sampling, machine description, timing, JSON output.

Every benchmark records the machine (CPU model, cores, memory), library versions and the load
average before and after it ran, because the benchmark machine may be shared; ratios measured in
one run are the numbers to trust, absolute times less so.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORK_DIR = Path(__file__).resolve().parent / "_work"

_PACKAGES = ("numpy", "scipy", "dask", "distributed", "zarr", "anndata", "numba", "pot", "xarray", "ssa_dask")


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (falls back to :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory, OS, Python and package versions."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


class PeakMemory:
    """Sample the summed RSS of a process and all its descendants from a background thread.

    Parameters
    ----------
    pid
        Root process (default: this one).
    interval
        Seconds between samples.

    Attributes
    ----------
    peak_bytes : int
        Largest summed RSS seen so far.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.05) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        """Summed RSS of the process tree now (bytes); updates :attr:`peak_bytes`."""
        total = 0
        for p in _tree(self.proc):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_gib(self) -> float:
        """:attr:`peak_bytes` in GiB."""
        return self.peak_bytes / 2**30


def run_child(script: str | Path, argv: Sequence[str], result: Path, log: Path, interval: float = 0.2) -> dict[str, Any]:
    """Run ``script`` as a fresh child process (``argv`` plus ``--result RESULT``), sampling the peak RSS
    of its process tree; return the JSON it wrote to ``result`` with ``peak_rss_gib`` and
    ``process_seconds`` added."""
    result.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(script).resolve()), *argv, "--result", str(result)]
    t0 = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)
        with PeakMemory(proc.pid, interval=interval) as mem:
            rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"child failed (rc={rc}); see {log}:\n{log.read_text()[-3000:]}")
    out = json.loads(result.read_text())
    out["peak_rss_gib"] = mem.peak_gib
    out["process_seconds"] = time.perf_counter() - t0
    return out


def io_bytes(proc: psutil.Process | None = None) -> dict[str, int]:
    """Bytes read and written by a process (storage layer, ``/proc/<pid>/io``), children included.

    ``read_chars``/``write_chars`` count every read/write call (page cache hits included);
    ``read_bytes``/``write_bytes`` only what reached the block device.
    """
    proc = proc or psutil.Process()
    out = {"read_bytes": 0, "write_bytes": 0, "read_chars": 0, "write_chars": 0}
    for p in _tree(proc):
        try:
            c = p.io_counters()
        except (psutil.Error, AttributeError):
            continue
        for k in out:
            out[k] += int(getattr(c, k, 0))
    return out


@dataclass
class Timing:
    """Repeated wall-clock timings of one call."""

    times: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return float(np.median(self.times))


def timeit(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times timed with ``perf_counter``."""
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        timing.times.append(time.perf_counter() - t0)
    return timing


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain-text table (also valid Markdown)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |")


def write_result(name: str, payload: dict[str, Any], load_before: list[float]) -> Path:
    """Write ``payload`` plus machine info and load averages to ``results/<name>.json``.

    Paths inside the repository are written relative to it, as ``<repo>/...``.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        **payload,
    }
    path = RESULTS_DIR / f"{name}.json"
    text = json.dumps(doc, indent=2, default=_json_default)
    # no absolute paths of the benchmark machine in committed results
    text = text.replace(str(REPO_ROOT), "<repo>").replace(json.dumps(str(REPO_ROOT))[1:-1], "<repo>")
    path.write_text(text + "\n")
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def _numba_sum():
    import numba

    @numba.njit(fastmath=True, nogil=True, cache=False)
    def _sum(a: np.ndarray) -> float:
        s = np.float32(0.0)
        for i in range(a.size):
            s += a[i]
        return s

    return _sum


def measure_bandwidth(n_bytes: int = 2 * 2**30, repeat: int = 7, threads: int | None = None) -> dict[str, Any]:
    """Memory read bandwidth: best of ``repeat`` full reads of a float32 array of ``n_bytes``.

    Three readers, each reading every byte once: ``numpy.sum`` in one thread, ``numpy.sum`` over
    ``threads`` equal slices in a thread pool (NumPy releases the GIL), and a compiled Numba
    ``nogil`` loop over the same slices. The best reading is the bandwidth used for the bounds.

    Returns
    -------
    dict
        ``*_gbs`` readings in 1e9 bytes/s, ``best_gbs``, ``best_method``, ``array_bytes``, ``threads``.
    """
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    nb_sum = _numba_sum()
    a = np.ones(n_bytes // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    nb_sum(a[:1024])
    with ThreadPoolExecutor(threads) as pool:
        readers = {
            "numpy_sum_1thread": lambda: a.sum(),
            f"numpy_sum_{threads}threads": lambda: list(pool.map(np.sum, parts)),
            f"numba_nogil_{threads}threads": lambda: list(pool.map(nb_sum, parts)),
        }
        res: dict[str, Any] = {"array_bytes": a.nbytes, "threads": threads}
        for name, fn in readers.items():
            res[f"{name}_gbs"] = a.nbytes / timeit(fn, repeat=repeat).best / 1e9
    best = max((k for k in res if k.endswith("_gbs")), key=res.__getitem__)
    res["best_method"] = best.removesuffix("_gbs")
    res["best_gbs"] = res[best]
    del a, parts
    return res
