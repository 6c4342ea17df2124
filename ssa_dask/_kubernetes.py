"""Kubernetes clusters through the Dask operator, for :func:`ssa_dask.cluster.connect`.

:func:`cluster_spec` builds the ``DaskCluster`` resource that ``--scheduler kubernetes`` creates
(the same shape as ``deploy/kubernetes/daskcluster.yaml``): our image, ``dask scheduler`` /
``dask worker``, a shared data volume, and TLS with credentials from a Kubernetes Secret.
:func:`kubernetes_cluster` creates it with kr8s, waits for the scheduler and the workers with a
timeout, and deletes it on exit.  ``dask_kubernetes.operator.KubeCluster`` is not used to drive the
cluster because it always connects to ``tcp://`` (its address helpers hard-code the scheme and
open ``rpc`` without TLS credentials), so it cannot reach a TLS scheduler.

``python -m ssa_dask._kubernetes tls-secret DIR`` writes TLS credentials to DIR and prints the
Secret manifest holding them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ssa_dask.errors import SSAClusterError, SSAInputError

log = logging.getLogger(__name__)

#: Where pods mount the TLS Secret, and the file names inside it.
TLS_MOUNT_PATH = "/etc/ssa-dask/tls"
TLS_FILES = {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"}
SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
WORKER_DASHBOARD_PORT = 8788
#: The image's non-root user (deploy/docker/Dockerfile).
RUN_AS_USER = 1000

#: Options of ``--cluster-config`` for ``--scheduler kubernetes`` and their defaults.
DEFAULT_OPTIONS: dict[str, Any] = {
    "name": "ssa-dask",
    "namespace": None,  # None: the kubeconfig's current namespace
    "image": "registry.example.org/ssa-dask:0.1.0",  # site-specific: where you pushed the image
    "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
    "scheduler_resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
    "env": {},
    "tls_secret": "ssa-dask-tls",
    "client_tls_dir": None,  # this client's copy of the Secret's files; None: from the dask config
    "volume_claim": "ssa-dask-data",  # None: no shared volume
    "mount_path": "/data",
    "timeout": 600,
}


def cluster_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` merged over :data:`DEFAULT_OPTIONS`; an unknown key raises ``SSAInputError``."""
    given = dict(options or {})
    unknown = sorted(set(given) - set(DEFAULT_OPTIONS))
    if unknown:
        raise SSAInputError(
            f"unknown Kubernetes cluster option(s) {unknown}; known: {sorted(DEFAULT_OPTIONS)}"
        )
    return {**DEFAULT_OPTIONS, **given}


def _tls_env() -> list[dict[str, str]]:
    """Dask config, as environment variables, pointing every role at the mounted Secret."""
    ca, cert, key = (f"{TLS_MOUNT_PATH}/{TLS_FILES[k]}" for k in ("ca", "cert", "key"))
    env = [
        {"name": "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION", "value": "true"},
        {"name": "DASK_DISTRIBUTED__COMM__TLS__CA_FILE", "value": ca},
    ]
    for role in ("SCHEDULER", "WORKER", "CLIENT"):
        env.append({"name": f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT", "value": cert})
        env.append({"name": f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY", "value": key})
    return env


def scheduler_address(cluster_name: str, *, insecure: bool = False) -> str:
    """The scheduler's address inside the cluster's namespace (the operator's Service name)."""
    return f"{'tcp' if insecure else 'tls'}://{cluster_name}-scheduler:{SCHEDULER_PORT}"


def pod_template(container: dict[str, Any], options: Mapping[str, Any], *, role: str, insecure: bool) -> dict[str, Any]:
    """A pod spec around ``container``: non-root, with the TLS Secret mounted and the Dask TLS
    config set; workers and jobs (``role`` ``"worker"``/``"job"``) also get the shared data volume
    and ``DASK_SCHEDULER_ADDRESS`` (set here, so the operator's ``tcp://`` default is not used)."""
    data = role != "scheduler"
    env = []
    if data:
        env.append({"name": "DASK_SCHEDULER_ADDRESS", "value": scheduler_address(options["name"], insecure=insecure)})
    if not insecure:
        env += _tls_env()
    env += [{"name": str(k), "value": str(v)} for k, v in (options["env"] or {}).items()]
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    if not insecure:
        mounts.append({"name": "tls", "mountPath": TLS_MOUNT_PATH, "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": options["tls_secret"], "defaultMode": 0o440}})
    if data and options["volume_claim"]:
        mounts.append({"name": "data", "mountPath": options["mount_path"]})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": options["volume_claim"]}})
    container = {**container, "env": env}
    if mounts:
        container["volumeMounts"] = mounts
    spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
        },
        "containers": [container],
    }
    if volumes:
        spec["volumes"] = volumes
    return spec


def cluster_spec(n_workers: int, options: Mapping[str, Any] | None = None, *, insecure: bool = False) -> dict:
    """The ``DaskCluster`` resource that ``--scheduler kubernetes`` creates.

    Parameters
    ----------
    n_workers : int
        Worker pods (replicas of the default worker group).
    options : mapping, optional
        Keys of :data:`DEFAULT_OPTIONS` (``--cluster-config``, e.g. ``deploy/kubernetes/cluster.yaml``).
    insecure : bool
        Plain ``tcp://`` without the TLS Secret: anyone who reaches the scheduler runs code in it.

    Returns
    -------
    dict
        The resource, ready for ``kubectl apply`` or the Kubernetes API.
    """
    if not isinstance(n_workers, int) or n_workers < 1:
        raise SSAInputError(f"n_workers must be a positive integer, got {n_workers!r}")
    opts = cluster_options(options)
    name = opts["name"]
    protocol = "tcp" if insecure else "tls"
    scheduler = {
        "name": "scheduler",
        "image": opts["image"],
        "args": ["dask", "scheduler", "--protocol", protocol, "--port", str(SCHEDULER_PORT),
                 "--dashboard-address", f":{DASHBOARD_PORT}"],
        "resources": opts["scheduler_resources"],
        "ports": [
            {"name": "tcp-comm", "containerPort": SCHEDULER_PORT, "protocol": "TCP"},
            {"name": "http-dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"port": "http-dashboard", "path": "/health"},
            "initialDelaySeconds": 0,
            "periodSeconds": 1,
            "timeoutSeconds": 300,
        },
        "livenessProbe": {
            "httpGet": {"port": "http-dashboard", "path": "/health"},
            "initialDelaySeconds": 15,
            "periodSeconds": 20,
        },
    }
    worker = {
        "name": "worker",
        "image": opts["image"],
        "args": ["dask", "worker", "$(DASK_SCHEDULER_ADDRESS)", "--name", "$(DASK_WORKER_NAME)",
                 "--dashboard-address", str(WORKER_DASHBOARD_PORT)],
        "resources": opts["resources"],
        "ports": [{"name": "http-dashboard", "containerPort": WORKER_DASHBOARD_PORT, "protocol": "TCP"}],
    }
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskCluster",
        "metadata": {"name": name},
        "spec": {
            "worker": {
                "replicas": n_workers,
                "spec": pod_template(worker, opts, role="worker", insecure=insecure),
            },
            "scheduler": {
                "spec": pod_template(scheduler, opts, role="scheduler", insecure=insecure),
                "service": {
                    "type": "ClusterIP",
                    "selector": {"dask.org/cluster-name": name, "dask.org/component": "scheduler"},
                    "ports": [
                        {"name": "tcp-comm", "protocol": "TCP", "port": SCHEDULER_PORT, "targetPort": "tcp-comm"},
                        {"name": "http-dashboard", "protocol": "TCP", "port": DASHBOARD_PORT,
                         "targetPort": "http-dashboard"},
                    ],
                },
            },
        },
    }


# --- TLS credentials -------------------------------------------------------------------------


def write_tls_files(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write a new self-signed key and certificate (``distributed.Security.temporary``, valid one
    year, one pair for every role) to ``directory`` as ``ca.crt``, ``tls.crt`` and ``tls.key``.

    Existing files are kept (so re-running does not lock out a running cluster); returns the paths.
    """
    from distributed import Security

    target = Path(directory).expanduser()
    paths = {role: target / filename for role, filename in TLS_FILES.items()}
    if all(p.exists() for p in paths.values()):
        return paths
    if any(p.exists() for p in paths.values()):
        raise SSAInputError(f"{target} holds only some of {sorted(TLS_FILES.values())}: remove them or complete them")
    security = Security.temporary()
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths["ca"].write_text(security.tls_ca_file)
    paths["cert"].write_text(security.tls_client_cert)
    fd = os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as key_file:
        key_file.write(security.tls_client_key)
    return paths


def tls_secret_manifest(directory: str | os.PathLike[str], name: str = "ssa-dask-tls") -> dict:
    """The ``Secret`` holding the TLS files of ``directory`` (see :func:`write_tls_files`)."""
    target = Path(directory).expanduser()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "ssa-dask"}},
        "type": "Opaque",
        "stringData": {filename: (target / filename).read_text() for filename in TLS_FILES.values()},
    }


def client_tls_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """Dask config giving this process's client the cluster's TLS credentials.

    From ``client_tls_dir`` when set, else what the dask config already holds (e.g. the
    ``DASK_DISTRIBUTED__COMM__TLS__*`` variables of a pod with the Secret mounted).
    Raises ``SSAClusterError`` when there are none, before anything is created.
    """
    import dask

    directory = options.get("client_tls_dir")
    if directory:
        files = {role: Path(directory).expanduser() / filename for role, filename in TLS_FILES.items()}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise SSAClusterError(
                f"client_tls_dir: missing {missing}; create the credentials with "
                f"`python -m ssa_dask._kubernetes tls-secret {directory}` (and apply the Secret it prints)"
            )
        return {
            "distributed.comm.require-encryption": True,
            "distributed.comm.tls.ca-file": str(files["ca"]),
            "distributed.comm.tls.client.cert": str(files["cert"]),
            "distributed.comm.tls.client.key": str(files["key"]),
        }
    if dask.config.get("distributed.comm.tls.ca-file", None) and dask.config.get(
        "distributed.comm.tls.client.cert", None
    ):
        return {}
    raise SSAClusterError(
        "the Kubernetes cluster uses TLS but this client has no credentials: set `client_tls_dir` in "
        "the cluster config to the directory given to `python -m ssa_dask._kubernetes tls-secret`, "
        "or set DASK_DISTRIBUTED__COMM__TLS__CA_FILE and ..._CLIENT__CERT/KEY (or pass --insecure)"
    )


# --- running a cluster -----------------------------------------------------------------------


def _kube_api(namespace: str | None) -> Any:
    """A kr8s API client, or ``SSAClusterError`` saying which credentials are missing."""
    try:
        import kr8s
    except ImportError as exc:
        raise SSAInputError(f"scheduler 'kubernetes' needs `pip install 'ssa_dask[kubernetes]'` ({exc})") from exc
    try:
        # kr8s caches API objects by their arguments: name the kubeconfig so a changed KUBECONFIG counts
        api = kr8s.api(namespace=namespace, kubeconfig=os.environ.get("KUBECONFIG"))
        api.version()
    except Exception as exc:  # kr8s raises ValueError, httpx and OS errors: all mean "no cluster"
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise SSAClusterError(
            f"cannot reach a Kubernetes API server ({type(exc).__name__}: {exc}); kubeconfig {where!r} "
            "(or the in-cluster service account) must give credentials for a cluster with the Dask "
            "operator installed: check `kubectl get daskclusters`"
        ) from None
    return api


def _pod_problems(api: Any, cluster_name: str, component: str) -> list[str]:
    """Why the cluster's ``component`` pods are not running, in Kubernetes' own words."""
    problems = []
    selector = {"dask.org/cluster-name": cluster_name, "dask.org/component": component}
    for pod in api.get("pods", namespace=api.namespace, label_selector=selector):
        status = pod.raw.get("status", {})
        for cond in status.get("conditions", []):
            if cond.get("status") == "False" and cond.get("message"):
                problems.append(f"{pod.name}: {cond.get('reason', cond['type'])}: {cond['message']}")
        for container in status.get("containerStatuses", []):
            waiting = container.get("state", {}).get("waiting")
            if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
                problems.append(f"{pod.name}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": "))
            terminated = container.get("lastState", {}).get("terminated")
            if terminated:
                problems.append(f"{pod.name}: exited {terminated.get('exitCode')} ({terminated.get('reason', '')})")
        problems += _warning_events(api, pod.name)
    return problems


def _warning_events(api: Any, pod_name: str, last: int = 3) -> list[str]:
    """The pod's latest warning events (failed mounts such as a missing Secret or PVC, failed
    scheduling), which its status does not show; none when events cannot be read."""
    try:
        events = api.get("events", namespace=api.namespace, field_selector={"involvedObject.name": pod_name})
        warnings = [e.raw for e in events if e.raw.get("type") == "Warning"]
    except Exception:  # events are a courtesy: RBAC may forbid them
        return []
    return [f"{pod_name}: {e.get('reason', '')}: {e.get('message', '')}" for e in warnings[-last:]]


def _ready(pod: dict) -> bool:
    """Whether a pod (its raw resource) reports the ``Ready`` condition."""
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


#: Container states that do not resolve by waiting.
_FATAL = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CrashLoopBackOff", "CreateContainerConfigError")


def _wait_for_scheduler(api: Any, cluster_name: str, deadline: float) -> None:
    """Return when the scheduler pod is ready; raise ``SSAClusterError`` with the pod's reason."""
    selector = {"dask.org/cluster-name": cluster_name, "dask.org/component": "scheduler"}
    while True:
        pods = list(api.get("pods", namespace=api.namespace, label_selector=selector))
        if pods and all(_ready(pod.raw) for pod in pods):
            return
        problems = _pod_problems(api, cluster_name, "scheduler")
        if any(reason in p for p in problems for reason in _FATAL) or time.monotonic() > deadline:
            if not pods:
                problems = ["no scheduler pod was created: is the Dask operator running in this cluster?"]
            raise SSAClusterError(f"the Dask scheduler of {cluster_name!r} did not start: " + "; ".join(problems))
        time.sleep(2)


@contextlib.contextmanager
def _scheduler_endpoint(api: Any, cluster_name: str, deadline: float, *, insecure: bool) -> Iterator[str]:
    """The scheduler's address from here: the Service's DNS name inside the cluster, else a port
    forward to it on 127.0.0.1 (waiting for the Service until ``deadline``)."""
    service = f"{cluster_name}-scheduler"
    scheme = "tcp" if insecure else "tls"
    host = f"{service}.{api.namespace}.svc"
    try:
        socket.getaddrinfo(host, SCHEDULER_PORT)
    except OSError:
        import kr8s

        wait_s = max(2, deadline - time.monotonic())
        svc = kr8s.objects.Service.get(service, namespace=api.namespace, api=api, timeout=wait_s)
        with svc.portforward(SCHEDULER_PORT, local_port="auto") as port:
            yield f"{scheme}://127.0.0.1:{port}"
        return
    yield f"{scheme}://{host}:{SCHEDULER_PORT}"


@contextlib.contextmanager
def kubernetes_cluster(
    n_workers: int,
    options: Mapping[str, Any] | None,
    *,
    insecure: bool = False,
    timeout: float | None = None,
) -> Iterator[str]:
    """Create the :func:`cluster_spec` ``DaskCluster``, wait for its workers, delete it on exit.

    Parameters
    ----------
    n_workers : int
        Worker pods to start.
    options : mapping
        Cluster options (:data:`DEFAULT_OPTIONS`; ``deploy/kubernetes/cluster.yaml``).
    insecure : bool
        Without TLS (logged as a warning): anyone who reaches the scheduler runs code as its pods.
    timeout : float, optional
        Seconds to wait for the scheduler and the workers (default: option ``timeout``).

    Yields
    ------
    str
        The scheduler's address. While the context is open, the dask config holds this client's TLS
        credentials, so ``distributed.Client(address)`` connects with them.

    Raises
    ------
    SSAClusterError
        No Kubernetes credentials, the API refused the resource, or the pods did not start in time
        (the message gives Kubernetes' reason: image pull, scheduling, crash, missing Secret).
    """
    import dask

    opts = cluster_options(options)
    spec = cluster_spec(n_workers, opts, insecure=insecure)
    wait_s = float(timeout if timeout is not None else opts["timeout"])
    tls_config = {} if insecure else client_tls_config(opts)
    if insecure:
        log.warning(
            "INSECURE: the Kubernetes Dask scheduler listens on plain tcp:// without TLS; anyone who can "
            "reach it in the cluster can run code in its pods and read your data"
        )
    api = _kube_api(opts["namespace"])
    import httpx
    import kr8s

    api_errors = (kr8s.ServerError, kr8s.NotFoundError, kr8s.APITimeoutError, httpx.HTTPError)
    daskcluster_class = kr8s.objects.new_class(kind="DaskCluster", version="kubernetes.dask.org/v1", asyncio=False)
    resource = daskcluster_class(spec, namespace=api.namespace, api=api)
    name = spec["metadata"]["name"]
    try:
        resource.create()
    except api_errors as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = {
            404: " (are the Dask operator's CRDs installed? `kubectl get crd daskclusters.kubernetes.dask.org`)",
            409: f" (left by an earlier run? `kubectl delete daskcluster {name}`, or set another `name`)",
        }.get(status, "")
        raise SSAClusterError(f"the Kubernetes API refused DaskCluster {name!r}: {exc}{hint}") from None
    with contextlib.ExitStack() as stack:
        stack.callback(_delete_quietly, resource)
        try:
            deadline = time.monotonic() + wait_s
            _wait_for_scheduler(api, name, deadline)
            stack.enter_context(dask.config.set(tls_config))
            address = stack.enter_context(_scheduler_endpoint(api, name, deadline, insecure=insecure))
            _wait_for_workers(api, address, name, n_workers, deadline)
        except api_errors as exc:
            raise SSAClusterError(f"Kubernetes API error while starting DaskCluster {name!r}: {exc}") from None
        log.info("Kubernetes DaskCluster %s/%s ready at %s", api.namespace, name, address)
        yield address


def _delete_quietly(resource: Any) -> None:
    """Delete the DaskCluster (the operator removes its pods); a failure is logged, not raised."""
    try:
        resource.delete()
    except Exception as exc:  # the run's own outcome matters more than the clean-up's
        log.warning("could not delete DaskCluster %s: %s; delete it with `kubectl delete daskcluster %s`",
                    resource.name, exc, resource.name)


def _wait_for_workers(api: Any, address: str, cluster_name: str, n_workers: int, deadline: float) -> None:
    """Return once ``n_workers`` workers joined; raise ``SSAClusterError`` with the pods' reasons."""
    from distributed import Client

    try:
        with Client(address, timeout=max(1.0, deadline - time.monotonic())) as client:
            client.wait_for_workers(n_workers, timeout=max(1.0, deadline - time.monotonic()))
    except (OSError, TimeoutError) as exc:
        problems = _pod_problems(api, cluster_name, "worker") or [f"{type(exc).__name__}: {exc}"]
        raise SSAClusterError(
            f"{n_workers} Dask worker(s) of {cluster_name!r} did not join the scheduler at {address}: "
            + "; ".join(problems)
        ) from None


def main(argv: list[str] | None = None) -> int:
    """``python -m ssa_dask._kubernetes tls-secret DIR``: write TLS files, print their Secret."""
    import yaml

    parser = argparse.ArgumentParser(prog="python -m ssa_dask._kubernetes")
    commands = parser.add_subparsers(dest="command", required=True)
    tls = commands.add_parser("tls-secret", help="write TLS credentials to DIR and print the Secret holding them")
    tls.add_argument("directory")
    tls.add_argument("--name", default=DEFAULT_OPTIONS["tls_secret"])
    args = parser.parse_args(argv)
    write_tls_files(args.directory)
    sys.stdout.write(yaml.safe_dump(tls_secret_manifest(args.directory, args.name), sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
