"""Real multi-process Dask: an external scheduler and workers started elsewhere, worker loss, TLS, loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import psutil
import pytest
import xarray as xr

import ssa_dask
from ssa_dask.cluster import Executor, connect
from ssa_dask.cost import PearsonCost, cost_blocks
from ssa_dask.errors import SSAClusterError, SSAInputError
from ssa_dask.kernel.build import build_kernel
from ssa_dask.sinkhorn import sinkhorn

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DaskProcesses:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, started in ``cwd``, stopped by PID."""

    def __init__(self, cwd: Path, n_workers: int = 2, tls: dict[str, str] | None = None, nanny: bool = False) -> None:
        self.cwd = cwd
        self.port = _free_port()
        protocol = "tls" if tls else "tcp"
        self.address = f"{protocol}://127.0.0.1:{self.port}"
        tls_args = [f"--tls-ca-file={tls['ca']}", f"--tls-cert={tls['cert']}", f"--tls-key={tls['key']}"] if tls else []
        env = dict(os.environ, PYTHONPATH=str(Path(ssa_dask.__file__).parents[1]))
        self.scheduler = subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--dashboard-address",
             "127.0.0.1:0", "--protocol", protocol, *tls_args],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.workers = [
            subprocess.Popen(
                [str(BIN / "dask"), "worker", self.address, "--nthreads", "1", "--host", "127.0.0.1",
                 "--nanny" if nanny else "--no-nanny", "--memory-limit", "2GiB", *tls_args],
                cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            for _ in range(n_workers)
        ]

    def stop(self) -> None:
        for process in [*self.workers, self.scheduler]:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


@pytest.fixture
def dask_processes(tmp_path):
    """Scheduler + 2 workers whose working directory is a different folder than the test's."""
    elsewhere = tmp_path / "workers_cwd"
    elsewhere.mkdir()
    processes = DaskProcesses(elsewhere)
    try:
        yield processes
    finally:
        processes.stop()


def _write_problem(folder: Path, counts_problem) -> None:
    sc, spots = counts_problem
    genes = [f"g{i}" for i in range(sc.shape[1])]
    cells = ad.AnnData(sc.astype(np.float32), var=pd.DataFrame(index=genes),
                       obs=pd.DataFrame(index=[f"c{i}" for i in range(sc.shape[0])]))
    slide = ad.AnnData(spots.astype(np.float32), var=pd.DataFrame(index=genes),
                       obs=pd.DataFrame({"x": np.arange(spots.shape[0], dtype=float), "y": 0.0},
                                        index=[f"s{i}" for i in range(spots.shape[0])]))
    folder.mkdir(parents=True)
    cells.write_zarr(folder / "cells.zarr")
    slide.write_h5ad(folder / "spots.h5ad")


def _cli(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(ssa_dask.__file__).parents[1]), COLUMNS="200")
    return subprocess.run([str(BIN / "ssa-dask"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_relative_paths_on_external_scheduler_started_elsewhere(dask_processes, tmp_path, counts_problem):
    """Workers running in another directory read relative input paths correctly (not as empty stores)."""
    project = tmp_path / "project"
    _write_problem(project / "data", counts_problem)
    common = ["align", "data/cells.zarr", "data/spots.h5ad", "--n-genes", "30", "--tol", "1e-7", "--block-rows", "64",
              "--kernel-storage", "zarr", "--kernel-path", "scratch"]
    external = _cli([*common, "-o", "external.zarr", "--scheduler", dask_processes.address], cwd=project)
    assert external.returncode == 0, external.stderr
    threads = _cli([*common, "-o", "threads.zarr", "--scheduler", "threads"], cwd=project)
    assert threads.returncode == 0, threads.stderr
    a, b = xr.open_zarr(project / "external.zarr"), xr.open_zarr(project / "threads.zarr")
    np.testing.assert_array_equal(a["spot"].values, b["spot"].values)
    np.testing.assert_allclose(a["probability"].values, b["probability"].values, rtol=1e-6)
    assert "Sending large graph" not in external.stderr
    assert list((project / "scratch").iterdir()) == []  # the kernel store is removed after the run


def _kernel_on(executor: Executor, counts_problem, storage: str, path: Path | None = None):
    sc, spots = counts_problem
    cost = PearsonCost.from_statistics(sc.mean(0), sc.std(0), spots, spots.mean(0), spots.std(0))
    X = ssa_dask.read_expression(sc, chunk_rows=25).X
    return build_kernel(cost_blocks(X, cost), executor, lam=0.05, storage=storage, path=path)


@pytest.mark.filterwarnings("ignore::ssa_dask.ConvergenceWarning")
@pytest.mark.parametrize("storage", ["memory", "zarr"])
def test_worker_killed_mid_sinkhorn_gives_bit_identical_result(dask_processes, counts_problem, storage, tmp_path):
    """``kill -9`` of a worker during Sinkhorn: its kernel blocks are recomputed from the graph."""
    from distributed import Client

    sc, spots = counts_problem
    p = sc.sum(1) / sc.sum()
    q = spots.sum(1) / spots.sum()
    with Client(dask_processes.address) as client:
        client.wait_for_workers(2, timeout=30)
        executor = Executor(client)
        kernel = _kernel_on(executor, counts_problem, storage, tmp_path)
        undisturbed = sinkhorn(kernel, p, q, tol=1e-12, max_iter=60, executor=executor)
        victim = dask_processes.workers[0]

        def kill_at_iteration_5(iteration, g, error, eps):
            if iteration == 5:
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=30)

        disturbed = sinkhorn(kernel, p, q, tol=1e-12, max_iter=60, executor=executor, callback=kill_at_iteration_5)
        kernel.close()
        assert victim.returncode == -signal.SIGKILL
        assert len(client.scheduler_info()["workers"]) == 1
    np.testing.assert_array_equal(disturbed.g, undisturbed.g)
    assert disturbed.n_iter == undisturbed.n_iter == 60


def test_unreachable_scheduler_fails_fast_with_reason():
    port = _free_port()  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(SSAClusterError, match=f"cannot connect to the Dask scheduler at tcp://127.0.0.1:{port}"):
        with connect(f"tcp://127.0.0.1:{port}", timeout=3):
            pass
    assert time.perf_counter() - start < 20


def test_unknown_scheduler_is_refused_before_anything_starts():
    with pytest.raises(SSAInputError, match="unknown scheduler 'bogus'"):
        with connect("bogus"):
            pass


def _temporary_tls(folder: Path) -> dict[str, str]:
    from distributed import Security

    security = Security.temporary()
    files = {"ca": security.tls_ca_file, "cert": security.tls_scheduler_cert, "key": security.tls_scheduler_key}
    paths = {}
    for name, pem in files.items():
        path = folder / f"{name}.pem"
        path.write_text(pem)
        paths[name] = str(path)
    return paths


def test_tls_scheduler_refuses_clients_without_credentials(tmp_path, counts_problem):
    pytest.importorskip("cryptography", reason="temporary TLS credentials need the cryptography package")
    tls = _temporary_tls(tmp_path)
    processes = DaskProcesses(tmp_path, n_workers=1, tls=tls)
    try:
        with pytest.raises(SSAInputError, match="needs TLS credentials"):
            with connect(processes.address):
                pass
        with pytest.raises(SSAClusterError, match="cannot connect"):  # plain TCP to a TLS listener
            with connect(processes.address.replace("tls://", "tcp://"), timeout=3):
                pass
        security = ssa_dask.cluster.tls_security(tls["ca"], tls["cert"], tls["key"])
        sc, spots = counts_problem
        with connect(processes.address, security=security, timeout=30) as executor:
            on_tls = ssa_dask.align(sc, spots, n_genes=30, tol=1e-7, client=executor.client)
    finally:
        processes.stop()
    threads = ssa_dask.align(sc, spots, n_genes=30, tol=1e-7)
    np.testing.assert_array_equal(on_tls["spot"].values, threads["spot"].values)


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    return [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def test_embedded_cluster_listens_on_loopback_only():
    with connect("local", n_workers=2) as executor:
        me = psutil.Process()
        pids = {me.pid, *(child.pid for child in me.children(recursive=True))}
        sockets = _listening(pids)
        assert executor.client.dashboard_link.startswith("http://127.0.0.1:")
    assert len(sockets) >= 4  # scheduler, its dashboard, two workers (and their nannies)
    assert all(ip in ("127.0.0.1", "::1") for ip, _ in sockets), sockets


def test_sigterm_mid_run_cleans_up_and_prints_one_line(tmp_path, counts_problem):
    project = tmp_path / "project"
    _write_problem(project / "data", counts_problem)
    scratch = project / "scratch"
    env = dict(os.environ, PYTHONPATH=str(Path(ssa_dask.__file__).parents[1]), COLUMNS="200")
    process = subprocess.Popen(
        [str(BIN / "ssa-dask"), "align", "data/cells.zarr", "data/spots.h5ad", "-o", "out.zarr", "--n-genes", "30",
         "--tol", "1e-300", "--max-iter", "100000000", "--kernel-storage", "zarr", "--kernel-path", "scratch",
         "--scheduler", "threads", "--no-log1p"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any((store / "manifest.json").exists() for store in scratch.glob("ssa-kernel-*")):
        time.sleep(0.2)
    assert any(scratch.glob("ssa-kernel-*")), "the run never built its kernel store"
    time.sleep(1.0)  # well inside Sinkhorn
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted by SIGTERM"), stderr
    assert all(" INFO " in line or line.lstrip().startswith("INFO") for line in lines[:-1]), stderr  # nothing else
    assert list(scratch.iterdir()) == []
    assert not (project / "out.zarr").exists()


def test_spot_profiles_do_not_travel_inside_the_graph(tmp_path):
    """A 1,500-spot x 2,500-gene slide (15 MB of profiles) used to ride in every distributed graph."""
    import logging
    import warnings

    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(2500)]
    cells = sp.random(600, 2500, density=0.05, format="csr", random_state=1, dtype=np.float32)
    cells.data = np.ceil(cells.data * 10)
    ad.AnnData(cells, var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "sc.h5ad")
    slide = rng.poisson(2.0, size=(1500, 2500)).astype(np.float32)
    ad.AnnData(slide, var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "spots.h5ad")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # distributed's loggers do not propagate to pytest's caplog
    logging.getLogger("distributed").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with connect("local", n_workers=2) as executor:
                on_cluster = ssa_dask.align(str(tmp_path / "sc.h5ad"), str(tmp_path / "spots.h5ad"),
                                            client=executor.client)
    finally:
        logging.getLogger("distributed").removeHandler(handler)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in messages if "large graph" in m], messages
    threads = ssa_dask.align(str(tmp_path / "sc.h5ad"), str(tmp_path / "spots.h5ad"))
    np.testing.assert_array_equal(on_cluster["spot"].values, threads["spot"].values)
