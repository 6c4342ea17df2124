"""SLURM for real: a one-node SLURM on 127.0.0.1 (munged, slurmctld, slurmd started here, see
``tests/slurm_cluster.py``) runs ``ssa-dask align --scheduler slurm`` and
``deploy/slurm/align.sbatch``; results match ``--scheduler threads``; a cancelled worker job is
replaced; killing the driver leaves no job; bad configs fail fast; the scheduler speaks TLS only.

Without slurm-wlm and munge installed (``.ci/install-slurm``) these tests skip, except the checks
of the option validation, which need no cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from slurm_cluster import LocalSlurm, missing_binaries
from ssa_dask import _slurm
from ssa_dask.errors import ConvergenceWarning, SSAClusterError

ROOT = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = ROOT / "deploy" / "slurm" / "align.sbatch"
#: Options of a run that converges quickly, and of one that runs ~400 Sinkhorn iterations (~15 s).
SHORT = ["--block-rows", "500"]
LONG = ["--tol", "1e-300", "--max-iter", "400", "--block-rows", "250"]
CLI = [sys.executable, "-c", "from ssa_dask.cli import main; main()"]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A running one-node SLURM; ``SLURM_CONF`` points at it for this process and its children."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm not installed: run .ci/install-slurm (missing {', '.join(missing)})")
    if os.geteuid() != 0:
        pytest.skip("the test SLURM needs root: slurmd starts jobs as their owner")
    pytest.importorskip("dask_jobqueue", reason="needs the slurm extra: pip install 'ssa_dask[slurm]'")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    if cluster.cpus < 2:
        pytest.skip("the SLURM tests need 2 CPUs (a driver job and a worker job)")
    patch = pytest.MonkeyPatch()
    try:
        cluster.start()
        for key, value in cluster.env.items():
            patch.setenv(key, value)
        yield cluster
    finally:
        patch.undo()
        cluster.stop()


@pytest.fixture(scope="session")
def test_config(slurm: LocalSlurm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster config for the test SLURM: 1-core, 2 GiB worker jobs on loopback."""
    root = tmp_path_factory.mktemp("slurm_run")
    options = yaml.safe_load((ROOT / "tests" / "data" / "slurm_test_cluster.yaml").read_text())
    options.update(local_directory=str(root / "local"), log_directory=str(root / "logs"),
                   shared_temp_directory=str(root / "tls"))
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(options))
    return path


@pytest.fixture(scope="session")
def problem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2,000 cells x 100 spots x 60 genes as .h5ad, and the ``--scheduler threads`` results of the
    SHORT and LONG options."""
    import anndata as ad
    import pandas as pd
    from typer.testing import CliRunner

    from ssa_dask.cli import app

    root = tmp_path_factory.mktemp("slurm_problem")
    rng = np.random.default_rng(11)
    n_cells, n_spots, n_genes, n_types = 2000, 100, 60, 6
    programmes = rng.gamma(0.6, 3.0, size=(n_types, n_genes))
    cell_type = rng.integers(0, n_types, size=n_cells)
    sc = rng.poisson(programmes[cell_type] * rng.gamma(4.0, 0.5, size=(n_cells, 1))).astype(np.float32)
    spots = rng.poisson(20 * rng.dirichlet(np.full(n_types, 0.3), size=n_spots) @ programmes).astype(np.float32)
    genes = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    xy = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)
    ad.AnnData(sc, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]), var=genes).write_h5ad(root / "sc.h5ad")
    ad.AnnData(spots, obs=pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}, index=[f"s{i}" for i in range(n_spots)]),
               var=genes).write_h5ad(root / "spots.h5ad")
    paths = {"sc": root / "sc.h5ad", "spots": root / "spots.h5ad"}
    for name, options in (("short", SHORT), ("long", LONG)):
        out = root / f"threads_{name}.zarr"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # LONG stops at max_iter on purpose
            done = CliRunner().invoke(app, ["align", str(paths["sc"]), str(paths["spots"]), "-o", str(out),
                                            "--scheduler", "threads", *options])
        assert done.exit_code == 0, done.output
        paths[name] = out
    return paths


def _env(run_id: str, **extra: str) -> dict[str, str]:
    """Environment of a CLI or sbatch run: this checkout first on PYTHONPATH, worker jobs named by run_id."""
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path, "SSA_RUN_ID": run_id, **extra}


def _align_args(problem: dict[str, Any], out: Path, config: Path, options: list[str]) -> list[str]:
    return [*CLI, "align", str(problem["sc"]), str(problem["spots"]), "-o", str(out), "--scheduler", "slurm",
            "--n-workers", "1", "--cluster-config", str(config), *options]


def _run_id() -> str:
    return uuid.uuid4().hex[:8]


def _wait_for(condition: Callable[[], Any], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout:g} s")
        time.sleep(0.25)


def _jobs_named(slurm: LocalSlurm, name: str, states: tuple[str, ...] | None = None) -> list[dict[str, str]]:
    return [job for job in slurm.jobs() if job["name"] == name and (states is None or job["state"] in states)]


def _assert_same_result(path: Path, reference: Path) -> None:
    from ssa_dask.assign import read_result

    got, want = read_result(str(path)).load(), read_result(str(reference)).load()
    np.testing.assert_array_equal(got["spot"].values, want["spot"].values)
    np.testing.assert_array_equal(got["top_spot"].values, want["top_spot"].values)
    np.testing.assert_allclose(got["probability"].values, want["probability"].values, rtol=1e-5, atol=1e-7)
    assert got.attrs["n_iter"] == want.attrs["n_iter"]


# ---------------------------------------------------------------------------------------------
# runs that must give the threads result


def test_cli_on_slurm_matches_threads(slurm, test_config, problem, tmp_path):
    run_id = _run_id()
    out = tmp_path / "slurm.zarr"
    done = subprocess.run(_align_args(problem, out, test_config, SHORT), env=_env(run_id), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"worker job(s) named ssa-worker-{run_id}" in " ".join(done.stderr.split())
    _assert_same_result(out, problem["short"])
    assert not _jobs_named(slurm, f"ssa-worker-{run_id}")


def test_sbatch_driver_matches_threads(slurm, test_config, problem, tmp_path):
    """align.sbatch finds deploy/slurm/cluster.yaml under the submit directory (not next to
    slurmd's spool copy of the script) and passes extra ``ssa-dask align`` options through."""
    submit_dir = tmp_path / "submit"
    (submit_dir / "deploy" / "slurm").mkdir(parents=True)
    (submit_dir / "deploy" / "slurm" / "cluster.yaml").write_text(test_config.read_text())
    out = tmp_path / "sbatch.zarr"
    run_env = _env("unused")
    run_env.pop("SSA_RUN_ID")
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=1", "--mem=2G", f"--output={tmp_path / 'driver.log'}",
         str(SBATCH_SCRIPT), str(problem["sc"]), str(problem["spots"]), str(out), "--n-workers", "1", *SHORT],
        cwd=submit_dir, env=run_env, capture_output=True, text=True, timeout=30, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    state = _wait_for(lambda: (s := slurm.job_state(job_id)) not in ("PENDING", "RUNNING", "CONFIGURING", "") and s,
                      120, "the driver job did not finish")
    log = (tmp_path / "driver.log").read_text()
    assert state == "COMPLETED", log
    assert "--block-rows" not in log  # no usage error: the extra options reached ssa-dask align
    _assert_same_result(out, problem["short"])
    assert not _jobs_named(slurm, f"ssa-worker-{job_id}")


def test_cancelled_worker_job_is_replaced_and_result_identical(slurm, test_config, problem, tmp_path):
    run_id = _run_id()
    name = f"ssa-worker-{run_id}"
    out = tmp_path / "slurm.zarr"
    proc = subprocess.Popen(_align_args(problem, out, test_config, LONG), env=_env(run_id), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = _wait_for(lambda: _jobs_named(slurm, name, ("RUNNING",)), 60, "no worker job running")[0]["id"]
        time.sleep(6)  # the worker holds kernel blocks and Sinkhorn is iterating
        assert proc.poll() is None, "the run ended before the worker job could be cancelled"
        slurm.run("scancel", first)
        _wait_for(lambda: [j for j in _jobs_named(slurm, name, ("RUNNING",)) if j["id"] != first], 30,
                  "the cancelled worker job was not replaced")
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "Removing worker" in output  # the loss happened mid-computation
    _assert_same_result(out, problem["long"])
    _wait_for(lambda: not _jobs_named(slurm, name), 10, "worker jobs left in the queue")


# ---------------------------------------------------------------------------------------------
# killing the driver leaves no job


@pytest.mark.parametrize("extra_jobs", [0, 1], ids=["mid-run", "while-a-job-is-pending"])
def test_sigterm_to_cli_cancels_worker_jobs(slurm, test_config, problem, tmp_path, extra_jobs):
    """SIGTERM (scancel, walltime) to ``ssa-dask``: computing, or still waiting for a queued job."""
    run_id = _run_id()
    name = f"ssa-worker-{run_id}"
    out = tmp_path / "slurm.zarr"
    args = _align_args(problem, out, test_config, LONG) + ["--n-workers", str(1 + extra_jobs * slurm.cpus)]
    proc = subprocess.Popen(args, env=_env(run_id), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for(lambda: _jobs_named(slurm, name, ("RUNNING",)), 60, "no worker job running")
        if extra_jobs:
            _wait_for(lambda: _jobs_named(slurm, name, ("PENDING",)), 30, "no worker job pending")
        else:
            time.sleep(3)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not out.exists()
    _wait_for(lambda: not _jobs_named(slurm, name), 5, "worker jobs left in the queue after SIGTERM")


def test_scancel_of_sbatch_driver_cancels_worker_jobs(slurm, test_config, problem, tmp_path):
    job_id = _submit_driver(problem, tmp_path, test_config, LONG)
    name = f"ssa-worker-{job_id}"
    _wait_for(lambda: _jobs_named(slurm, name, ("RUNNING",)), 60, "no worker job of the driver running")
    time.sleep(3)
    slurm.run("scancel", job_id)
    _wait_for(lambda: not _jobs_named(slurm, name), 10, "worker jobs left in the queue after scancel of the driver")
    _wait_for(lambda: not [j for j in slurm.jobs() if j["id"] == job_id], 30, "the driver job did not end")
    assert not (tmp_path / "out.zarr").exists()


def test_sbatch_driver_cancels_worker_jobs_when_ssa_dask_is_killed(slurm, test_config, problem, tmp_path):
    """The fallback of align.sbatch: when ssa-dask dies without cleaning up (SIGKILL, out of
    memory), the script cancels the worker jobs by name."""
    job_id = _submit_driver(problem, tmp_path, test_config, LONG)
    name = f"ssa-worker-{job_id}"
    _wait_for(lambda: _jobs_named(slurm, name, ("RUNNING",)), 60, "no worker job of the driver running")
    listed = slurm.run("scontrol", "listpids", job_id).stdout.split()
    ssa_dask = [pid for pid in listed if pid.isdigit() and _is_ssa_dask(pid)]
    assert len(ssa_dask) == 1, listed
    os.kill(int(ssa_dask[0]), signal.SIGKILL)
    _wait_for(lambda: not _jobs_named(slurm, name), 10, "worker jobs left in the queue after ssa-dask was killed")
    _wait_for(lambda: slurm.job_state(job_id) == "FAILED", 30, "the driver job did not fail")


def _submit_driver(problem: dict[str, Any], tmp_path: Path, config: Path, options: list[str]) -> str:
    """Submit align.sbatch (config from SSA_CLUSTER_CONFIG, driver 1 CPU and 2 GiB); its job id."""
    env = {k: v for k, v in _env("unused", SSA_CLUSTER_CONFIG=str(config)).items() if k != "SSA_RUN_ID"}
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=1", "--mem=2G", f"--output={tmp_path / 'driver.log'}",
         str(SBATCH_SCRIPT), str(problem["sc"]), str(problem["spots"]), str(tmp_path / "out.zarr"),
         "--n-workers", "1", *options],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=True)
    return submitted.stdout.strip().split(";")[0]


def _is_ssa_dask(pid: str) -> bool:
    """Whether process ``pid`` is Python running ``ssa-dask align``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return Path(argv[0]).name.startswith("python") and "align" in argv


# ---------------------------------------------------------------------------------------------
# bad configurations fail fast with the reason, and submit nothing


@pytest.mark.parametrize(("change", "expected"), [
    ({"queue": "normal"}, r"partition 'normal' does not exist\. Partitions: debug \(default\)"),
    ({"cores": 64}, r"64 cores per job do not fit a node of partition 'debug'"),
], ids=["missing-partition", "too-many-cores"])
def test_bad_config_fails_fast(slurm, test_config, problem, tmp_path, change, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(test_config.read_text()), **change}))
    run_id = _run_id()
    start = time.monotonic()
    done = subprocess.run(_align_args(problem, tmp_path / "out.zarr", config, SHORT), env=_env(run_id),
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and re.search(expected, " ".join(done.stderr.split())), done.stderr
    assert "Traceback" not in done.stderr
    assert elapsed < 30
    assert not _jobs_named(slurm, f"ssa-worker-{run_id}")


def test_pending_workers_time_out_with_squeue_reason(slurm, test_config):
    options = yaml.safe_load(test_config.read_text())
    n_jobs = slurm.cpus + 1  # one more 1-core job than the node has cores: it stays PENDING
    start = time.monotonic()
    with pytest.raises(SSAClusterError, match=r"PENDING \(Resources\)") as info:
        with _slurm.slurm_cluster(n_jobs, options, timeout=8):
            pass
    assert time.monotonic() - start < 40
    assert f"{slurm.cpus} of {n_jobs} SLURM worker(s) connected within 8 s" in str(info.value)
    _wait_for(lambda: not [j for j in slurm.jobs() if j["name"].startswith("ssa-worker")], 10, "jobs left")


def test_sbatch_failure_is_reported(slurm, test_config, tmp_path, monkeypatch, caplog):
    """A submission that sbatch refuses after ``--test-only`` passed (a QOS limit, say): its error, fast."""
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    real = shutil.which("sbatch")
    fake.write_text(f"#!/bin/bash\n[ \"$1\" = --test-only ] && exec {real} \"$@\"\n"
                    "echo 'sbatch: error: QOSMaxSubmitJobPerUserLimit' >&2\n"
                    "echo 'sbatch: error: Batch job submission failed: Job violates accounting/QOS policy' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    start = time.monotonic()
    with pytest.raises(SSAClusterError, match=r"sbatch refused a worker job: QOSMaxSubmitJobPerUserLimit / "
                                              r"Batch job submission failed: Job violates accounting/QOS policy"):
        with _slurm.slurm_cluster(1, yaml.safe_load(test_config.read_text()), timeout=60):
            pass
    assert time.monotonic() - start < 20
    assert not [r for r in caplog.records if r.exc_info], "the failed submission's traceback was logged"


# ---------------------------------------------------------------------------------------------
# TLS


def test_scheduler_speaks_tls_only(slurm, test_config, tmp_path):
    from distributed import Client
    from distributed.security import Security

    options = {**yaml.safe_load(test_config.read_text()), "shared_temp_directory": str(tmp_path / "tls")}
    with _slurm.slurm_cluster(1, options, timeout=60) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        strangers = Security.temporary()  # valid TLS credentials, but not this cluster's
        with pytest.raises((OSError, TimeoutError)):
            Client(address, security=strangers, timeout=3)
        with pytest.raises((OSError, TimeoutError)):
            Client(address.replace("tls://", "tcp://"), timeout=3)
        with Client(cluster) as client:  # cluster.security holds the credentials
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
            assert all(w.startswith("tls://") for w in client.scheduler_info()["workers"])
        tls_dirs = list((tmp_path / "tls").glob("ssa-tls-*"))
        assert len(tls_dirs) == 1 and tls_dirs[0].stat().st_mode & 0o777 == 0o700
        assert {p.stat().st_mode & 0o777 for p in tls_dirs[0].iterdir()} == {0o600}
    assert not list((tmp_path / "tls").glob("ssa-tls-*"))  # credentials removed with the run


def test_insecure_opt_out_warns(slurm, test_config, caplog):
    with _slurm.slurm_cluster(1, yaml.safe_load(test_config.read_text()), insecure=True, timeout=60) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
    assert any("INSECURE" in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------------------------------------
# option checks against sinfo (no cluster needed)


SITE = [
    _slurm.NodeGroup("normal", True, "up", "2-00:00:00", 32, 192_000, 100),
    _slurm.NodeGroup("bigmem", False, "up", "1-00:00:00", 64, 1_500_000, 4),
    _slurm.NodeGroup("old", False, "down", "infinite", 16, 64_000, 10),
]


@pytest.mark.parametrize(("options", "expected"), [
    ({"queue": "gpu", "cores": 8, "memory": "32GiB"}, "partition 'gpu' does not exist"),
    ({"cores": 48, "memory": "32GiB"}, "48 cores per job do not fit a node of partition 'normal'"),
    ({"queue": "normal", "cores": 8, "memory": "300GiB"}, "307200 MiB per job with 8 cores"),
    ({"queue": "normal", "cores": 8, "job_mem": "200G"}, "204800 MiB per job"),
    ({"queue": "bigmem", "cores": 8, "memory": "32GiB", "walltime": "2-00:00:00"}, "exceeds the time limit"),
    ({"queue": "old", "cores": 8, "memory": "32GiB"}, "partition 'old' is down"),
], ids=["missing-partition", "too-many-cores", "too-much-memory", "job_mem", "walltime", "partition-down"])
def test_check_options_refuses_what_no_node_can_run(options, expected):
    with pytest.raises(SSAClusterError, match=re.escape(expected)) as info:
        _slurm.check_options({"walltime": "04:00:00", **options}, SITE)
    assert "normal (default): 100 node(s) of 32 cores, 192000 MiB" in str(info.value)


def test_check_options_accepts_what_fits():
    _slurm.check_options({"cores": 32, "memory": "180GiB", "walltime": "47:59:00"}, SITE)
    _slurm.check_options({"queue": "bigmem", "cores": 64, "job_mem": "1400G", "walltime": "1-00:00:00"}, SITE)
    with pytest.raises(SSAClusterError, match="no default partition"):
        _slurm.check_options({"cores": 1}, [g for g in SITE if not g.default])


def test_shipped_cluster_yaml_fits_a_typical_site_and_marks_site_values():
    text = (ROOT / "deploy" / "slurm" / "cluster.yaml").read_text()
    options = yaml.safe_load(text)
    _slurm.check_options(_slurm.with_defaults(options), SITE)
    for key in ("queue", "account", "cores", "memory", "walltime", "interface", "local_directory",
                "shared_temp_directory"):
        assert re.search(rf"^{key}:.*# SITE|# SITE.*\n(#.*\n)*{key}:", text, re.MULTILINE), key
    script = SBATCH_SCRIPT.read_text()
    assert "dirname" not in script and "SLURM_SUBMIT_DIR" in script and '"$@"' in script
    subprocess.run(["bash", "-n", str(SBATCH_SCRIPT)], check=True, timeout=10)


def test_second_interrupt_during_cleanup_is_held_back_then_raised():
    """Ctrl-C or SIGTERM while the worker jobs are being cancelled must not cut the cancelling short."""
    finished, before = False, signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with _slurm._interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            finished = True
    assert finished
    assert signal.getsignal(signal.SIGTERM) == before
