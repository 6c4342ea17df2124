"""The image of deploy/docker, run as the Dask operator would run deploy/kubernetes: a scheduler
container and worker containers with the exact args, environment and mounts of daskcluster.yaml
(TLS on, credentials in the mounted secret directory), then the DaskJob's driver container, all
sharing one network namespace on loopback (the scheduler Service is 127.0.0.1).  The result must
equal ``ssa_dask.align(..., client=None)`` on the same inputs.

Marked ``docker`` (excluded from the default suite): needs root, Docker (Debian's docker.io) and,
unless ``SSA_DASK_TEST_BASE_IMAGE`` names an image the daemon has or can pull, debootstrap and
deb.debian.org to build a Python 3 base image.  Wheels are downloaded on the host and the image is
built with ``--network none`` (pip ``--no-index``), as a site without registry access would.
Run: ``python -m pytest tests/test_docker.py -m docker``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import ssa_dask
from ssa_dask import _kubernetes as k8s

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "deploy" / "docker" / "wheels"  # in the build context, ignored by git
IMAGE = "ssa-dask:docker-test"
SERVICE_ADDRESS = "tls://127.0.0.1:8786"  # what <cluster>-scheduler resolves to, here
BLOCK_ROWS = 75  # 300 cells in 4 blocks


def run(cmd: list[str], env: dict | None = None, check: bool = True, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[:6])} ... exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="module")
def docker(request, tmp_path_factory):
    """A private dockerd (no bridge, no iptables: the host network is left alone), stopped by PID.
    Yields the environment that points the docker CLI at it."""
    if not re.search(r"(?<!not )\bdocker\b", request.config.getoption("markexpr") or ""):
        pytest.skip("takes minutes: run with -m docker")
    if os.geteuid() != 0:
        pytest.skip("dockerd needs root")
    if not (shutil.which("dockerd") and shutil.which("docker")):
        pytest.skip("Docker is not installed (apt-get install docker.io)")
    root = tmp_path_factory.mktemp("docker")
    sock = root / "docker.sock"
    log = open(root / "dockerd.log", "w")
    daemon = subprocess.Popen(
        ["dockerd", "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
         "--data-root", str(root / "data"), "--exec-root", str(root / "exec"), "--pidfile", str(root / "docker.pid"),
         "-H", f"unix://{sock}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}", "DOCKER_BUILDKIT": "0"}
    try:
        deadline = time.monotonic() + 60
        while run(["docker", "info"], env=env, check=False).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not start: {(root / 'dockerd.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield env
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()


@pytest.fixture(scope="module")
def base_image(docker, tmp_path_factory):
    """``SSA_DASK_TEST_BASE_IMAGE``, else Debian bookworm with python3-venv from debootstrap."""
    given = os.environ.get("SSA_DASK_TEST_BASE_IMAGE")
    if given:
        return given
    if not shutil.which("debootstrap"):
        pytest.skip("no base image: set SSA_DASK_TEST_BASE_IMAGE or install debootstrap")
    rootfs = tmp_path_factory.mktemp("rootfs")
    run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(rootfs)])
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run(["docker", "import", "-", "local/ssa-dask-base:bookworm"], env=docker, stdin=tar.stdout)
    assert tar.wait() == 0
    return "local/ssa-dask-base:bookworm"


@pytest.fixture(scope="module")
def image(docker, base_image):
    """deploy/docker/Dockerfile built offline from wheels downloaded here (the pinned set)."""
    version = run(["docker", "run", "--rm", "--network", "none", base_image, "python3", "-c",
                   "import sys; print('%d.%d' % sys.version_info[:2])"], env=docker).stdout.strip()
    if version != "%d.%d" % sys.version_info[:2]:
        pytest.skip(f"base image has Python {version}, this interpreter {sys.version_info[:2]}: wheels would not match")
    run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(WHEELS),
         "-r", str(REPO / "deploy" / "docker" / "constraints.txt")])
    run(["docker", "build", "--network", "none", "-f", "deploy/docker/Dockerfile", "-t", IMAGE,
         "--build-arg", f"BASE_IMAGE={base_image}",
         "--build-arg", "PIP_INSTALL_OPTIONS=--no-index --find-links /src/deploy/docker/wheels", "."],
        env=docker, cwd=REPO)
    return IMAGE


def pod(resource: dict, path: tuple[str, ...]) -> tuple[dict, dict]:
    spec = resource
    for key in path:
        spec = spec[key]
    (container,) = spec["containers"]
    return spec, container


def docker_run_args(pod_spec: dict, container: dict, mounts: dict[str, Path], extra_env: dict[str, str]) -> list[str]:
    """``docker run`` options and command that run ``container`` as the kubelet would: its env
    (``extra_env`` standing in for what the operator and the Service DNS provide), its volume mounts
    (``mounts``: volume name -> host directory), the pod's user, and the args with ``$(VAR)``
    expanded from the env."""
    env = {e["name"]: e["value"] for e in container.get("env", [])} | extra_env
    options = ["--user", f"{pod_spec['securityContext']['runAsUser']}:{pod_spec['securityContext']['runAsGroup']}"]
    for name, value in env.items():
        options += ["-e", f"{name}={value}"]
    for mount in container.get("volumeMounts", []):
        suffix = ":ro" if mount.get("readOnly") else ""
        options += ["-v", f"{mounts[mount['name']]}:{mount['mountPath']}{suffix}"]
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    return options + [IMAGE] + args


def wait_for_log(docker_env: dict, name: str, pattern: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        logs = run(["docker", "logs", name], env=docker_env, check=False)
        text = logs.stdout + logs.stderr
        if re.search(pattern, text):
            return text
        state = run(["docker", "inspect", "-f", "{{.State.Running}}", name], env=docker_env, check=False).stdout.strip()
        if state != "true" or time.monotonic() > deadline:
            raise AssertionError(f"{name}: no {pattern!r} (running={state}):\n{text[-3000:]}")
        time.sleep(0.5)


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")
def test_operator_pods_align_over_tls(docker, image, tmp_path, counts_problem):
    import anndata as ad
    import pandas as pd

    started = time.monotonic()
    (cluster,) = [d for d in yaml.safe_load_all((REPO / "deploy/kubernetes/daskcluster.yaml").read_text()) if d]
    (job,) = [d for d in yaml.safe_load_all((REPO / "deploy/kubernetes/daskjob.yaml").read_text()) if d]

    # the Secret and the PVC, as the kubelet presents them: group 1000 (fsGroup), mode 0440 for the secret
    tls, stranger = tmp_path / "tls", tmp_path / "stranger"  # stranger: someone else's credentials
    for directory in (tls, stranger):
        k8s.write_tls_files(directory)
        for path in [directory, *directory.iterdir()]:
            os.chown(path, 0, 1000)
            path.chmod(0o750 if path.is_dir() else 0o440)
    data = tmp_path / "data"
    data.mkdir()
    sc, spots = counts_problem
    genes = [f"g{i}" for i in range(sc.shape[1])]
    ad.AnnData(sc, var=pd.DataFrame(index=genes)).write_zarr(data / "sc.zarr")
    spot_obs = pd.DataFrame({"x": np.arange(len(spots), dtype=float), "y": np.zeros(len(spots))},
                            index=[f"s{i}" for i in range(len(spots))])
    ad.AnnData(spots, obs=spot_obs, var=pd.DataFrame(index=genes)).write_zarr(data / "spots.zarr")
    subprocess.run(["chown", "-R", "1000:1000", str(data)], check=True)
    mounts = {"tls": tls, "data": data}
    service = {"DASK_SCHEDULER_ADDRESS": SERVICE_ADDRESS}

    names = ["ssa-test-scheduler", "ssa-test-worker-0", "ssa-test-worker-1"]
    try:
        spec, container = pod(cluster, ("spec", "scheduler", "spec"))
        assert container["args"][:2] == ["dask", "scheduler"]
        run(["docker", "run", "-d", "--name", names[0], "--network", "none",
             *docker_run_args(spec, container, mounts, {})], env=docker)
        wait_for_log(docker, names[0], r"Scheduler at:\s+tls://")
        # the readiness probe's endpoint, over plain HTTP on the dashboard port
        health = run(["docker", "exec", names[0], "python3", "-c",
                      "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8787/health').read().decode())"],
                     env=docker)
        assert health.stdout.strip() == "ok"

        spec, container = pod(cluster, ("spec", "worker", "spec"))
        assert container["args"][:3] == ["dask", "worker", "$(DASK_SCHEDULER_ADDRESS)"]
        for i, name in enumerate(names[1:]):
            run(["docker", "run", "-d", "--name", name, "--network", f"container:{names[0]}",
                 *docker_run_args(spec, container, mounts, {**service, "DASK_WORKER_NAME": f"ssa-dask-default-worker-{i}"})],
                env=docker)
        for name in names[1:]:
            wait_for_log(docker, name, r"Registered to:\s+tls://127\.0\.0\.1:8786")
        assert run(["docker", "exec", names[1], "id", "-u"], env=docker).stdout.strip() == "1000"

        # nobody without the credentials gets in: plain tcp://, and tls:// with a stranger's certificate
        spec, container = pod(job, ("spec", "job", "spec"))
        theirs = "Security(tls_ca_file='/s/ca.crt', tls_client_cert='/s/tls.crt', tls_client_key='/s/tls.key')"
        for address, security, error in (("tcp://127.0.0.1:8786", "None", "CommClosedError"),
                                         (SERVICE_ADDRESS, theirs, "TLS certificate does not match")):
            refused = run(["docker", "run", "--rm", "--network", f"container:{names[0]}", "--user", "1000:1000",
                           "-v", f"{stranger}:/s:ro", IMAGE, "python3", "-c", "from distributed import Client, Security; "
                           f"Client({address!r}, security={security}, timeout=5)"], env=docker, check=False)
            assert refused.returncode != 0 and error in refused.stderr, f"{address}: {refused.stderr[-2000:]}"

        # the DaskJob's driver, exact args (inputs and output on the shared volume) plus a fixed
        # block size: the default follows the number of worker threads, and with it the order of
        # the floating-point sums
        assert container["args"][:2] == ["ssa-dask", "align"]
        container = {**container, "args": [*container["args"], "--block-rows", str(BLOCK_ROWS)]}
        run(["docker", "run", "--rm", "--network", f"container:{names[0]}",
             *docker_run_args(spec, container, mounts, service)], env=docker)
        elapsed = time.monotonic() - started
        for name in names[1:]:  # the work ran on the worker containers
            logs = run(["docker", "logs", name], env=docker, check=False)
            assert "Traceback" not in logs.stdout + logs.stderr
    finally:
        run(["docker", "rm", "-f", *names], env=docker, check=False)

    result = ssa_dask.read_result(str(data / "out.zarr"))
    direct = ssa_dask.align(str(data / "sc.zarr"), str(data / "spots.zarr"), client=None, block_rows=BLOCK_ROWS)
    assert result.sizes["cell"] == sc.shape[0]
    assert set(result.data_vars) == set(direct.data_vars)
    for name in set(direct.data_vars) - {"column_potential"}:  # bit-identical (the spots' potential: below)
        np.testing.assert_array_equal(result[name].values, direct[name].values, err_msg=name)
    assert result.attrs["n_iter"] == direct.attrs["n_iter"]
    # the spots' potential is summed over the blocks in the order they arrive: equal to rounding
    np.testing.assert_allclose(ssa_dask.column_potential(result), ssa_dask.column_potential(direct), rtol=1e-12)
    print(f"containers: scheduler + 2 workers + driver, {elapsed:.1f} s")
