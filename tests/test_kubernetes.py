"""deploy/kubernetes and ``--scheduler kubernetes`` without a cluster: every manifest and the
generated DaskCluster validated against the CRD schemas shipped in dask-kubernetes (jsonschema)
and the built-in kinds against Kubernetes' own schemas (kubernetes-validate, strict), TLS wiring,
and the errors a user without a cluster gets."""

from __future__ import annotations

import copy
import functools
import re
import ssl
from pathlib import Path

import numpy as np
import pytest
import yaml

from ssa_dask import _kubernetes as k8s
from ssa_dask.errors import SSAClusterError, SSAInputError

dask_kubernetes = pytest.importorskip("dask_kubernetes", reason="dask-kubernetes not installed (extra 'kubernetes')")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (extra 'test')")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate not installed (extra 'test')"
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MANIFESTS = REPO / "deploy" / "kubernetes"
CRDS = Path(dask_kubernetes.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator/crds"
#: Every pod of a DaskCluster / DaskJob, as paths into the resource.
POD_PATHS = {
    "DaskCluster": [("spec", "worker", "spec"), ("spec", "scheduler", "spec")],
    "DaskJob": [
        ("spec", "job", "spec"),
        ("spec", "cluster", "spec", "worker", "spec"),
        ("spec", "cluster", "spec", "scheduler", "spec"),
    ],
}
TLS_ENV = {
    "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION",
    "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
    *(f"DASK_DISTRIBUTED__COMM__TLS__{role}__{part}" for role in ("SCHEDULER", "WORKER", "CLIENT") for part in ("CERT", "KEY")),
}


def cluster_options() -> dict:
    return yaml.safe_load((MANIFESTS / "cluster.yaml").read_text())


def manifest(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc]


def all_manifests() -> list[tuple[str, dict]]:
    """Every resource in deploy/kubernetes (cluster.yaml holds options, not a resource)."""
    return [(p.name, doc) for p in sorted(MANIFESTS.glob("*.yaml")) if p.name != "cluster.yaml" for doc in manifest(p.name)]


def at(resource: dict, path: tuple[str, ...]) -> dict | None:
    for key in path:
        resource = resource.get(key) if isinstance(resource, dict) else None
    return resource


# --- validators --------------------------------------------------------------------------------


@functools.cache
def crd_schema(kind: str) -> dict:
    crd = yaml.load((CRDS / f"{kind.lower()}.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def drop_nulls(value):
    """What the API server stores: null fields pruned."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def pruned_fields(value, schema: dict, where: str = "") -> list[str]:
    """Fields the API server would silently drop: not declared by a structural schema."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{where}.{key}")
            else:
                found += pruned_fields(item, schema["properties"][key], f"{where}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += pruned_fields(item, schema["additionalProperties"], f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += pruned_fields(item, schema["items"], f"{where}[{i}]")
    return found


def crd_errors(resource: dict) -> list[str]:
    """Schema violations and pruned fields of a custom resource of dask-kubernetes."""
    schema = crd_schema(resource["kind"])
    data = drop_nulls(resource)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(data)]
    body = {k: v for k, v in data.items() if k not in ("apiVersion", "kind", "metadata")}  # always kept
    return errors + [f"unknown field {f}" for f in pruned_fields(body, schema)]


def builtin_errors(resource: dict) -> list[str]:
    """Kubernetes' own schema (the newest kubernetes-validate knows), strict: unknown fields fail."""
    try:
        kubernetes_validate.validate(drop_nulls(resource), kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    return []


def pod_errors(resource: dict) -> list[str]:
    """Each pod template of a DaskCluster/DaskJob checked strictly as a v1 Pod."""
    errors = []
    for path in POD_PATHS[resource["kind"]]:
        if at(resource, path) is None:  # a missing pod is the CRD schema's to report
            continue
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": at(resource, path)}
        errors += [f"{'.'.join(path)}: {e}" for e in builtin_errors(pod)]
    return errors


def all_errors(resource: dict) -> list[str]:
    if resource["apiVersion"].startswith("kubernetes.dask.org/"):
        return crd_errors(resource) + pod_errors(resource)
    return builtin_errors(resource)


# --- every manifest and the generated spec are valid ------------------------------------------


def test_crds_are_the_shipped_ones():
    for kind in ("DaskCluster", "DaskJob"):
        schema = crd_schema(kind)
        assert "spec" in schema["properties"]
    # the pod templates are full PodSpecs in the CRD, so the schema checks the containers too
    worker = crd_schema("DaskCluster")["properties"]["spec"]["properties"]["worker"]["properties"]["spec"]
    assert "containers" in worker["properties"]


@pytest.mark.parametrize("name,resource", all_manifests(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_is_valid(name, resource):
    assert all_errors(resource) == []


def test_every_manifest_kind_is_checked():
    kinds = sorted(r["kind"] for _, r in all_manifests())
    assert kinds == ["DaskCluster", "DaskJob", "PersistentVolumeClaim"]


@pytest.mark.parametrize("insecure", [False, True])
def test_generated_spec_is_valid(insecure):
    spec = k8s.cluster_spec(3, cluster_options(), insecure=insecure)
    assert all_errors(spec) == []
    assert spec["spec"]["worker"]["replicas"] == 3


def test_tls_secret_manifest_is_valid(tmp_path):
    k8s.write_tls_files(tmp_path / "tls")
    secret = k8s.tls_secret_manifest(tmp_path / "tls")
    assert builtin_errors(secret) == []
    assert set(secret["stringData"]) == {"ca.crt", "tls.crt", "tls.key"}


@pytest.mark.parametrize(
    "mutate,kind,expected",
    [
        (lambda r: r["spec"]["worker"].__setitem__("replicas", "four"), "DaskCluster", "is not of type 'integer'"),
        (lambda r: r["spec"].pop("scheduler"), "DaskCluster", "'scheduler' is a required property"),
        (lambda r: r["spec"]["scheduler"]["service"].__setitem__("ports", {"port": 8786}), "DaskCluster", "is not of type"),
        (lambda r: r["spec"].__setitem__("workers", {"replicas": 2}), "DaskCluster", "unknown field .spec.workers"),
        (lambda r: r["spec"]["worker"]["spec"]["containers"][0].__setitem__("volumeMount", []), "DaskCluster", "volumeMount"),
        (lambda r: r["spec"]["job"]["spec"]["containers"][0].__setitem__("args", "ssa-dask align"), "DaskJob",
         "is not of type 'array'"),
        (lambda r: r["spec"].pop("cluster"), "DaskJob", "'cluster' is a required property"),
        (lambda r: r["spec"].__setitem__("accessModes", "ReadWriteMany"), "PersistentVolumeClaim", "is not of type 'array'"),
        (lambda r: r["spec"].__setitem__("storageClass", "nfs"), "PersistentVolumeClaim", "storageClass"),
    ],
    ids=["replicas-type", "no-scheduler", "ports-type", "unknown-field", "container-typo", "job-args-type",
         "job-no-cluster", "pvc-type", "pvc-typo"],
)
def test_validators_reject_broken_manifests(mutate, kind, expected):
    (resource,) = [copy.deepcopy(r) for _, r in all_manifests() if r["kind"] == kind]
    assert all_errors(resource) == []
    mutate(resource)
    errors = all_errors(resource)
    assert errors and any(expected in e for e in errors), errors


# --- what the manifests run --------------------------------------------------------------------

REMOVED_COMMAND = re.compile(r"(?<![\w.-])dask-(scheduler|worker)(?![\w-])")


def test_removed_commands_appear_nowhere():
    texts = {str(p.relative_to(REPO)): p.read_text() for p in DEPLOY.rglob("*") if p.is_file() and "wheels" not in p.parts}
    texts["generated"] = yaml.safe_dump(k8s.cluster_spec(2, cluster_options()))
    texts["generated --insecure"] = yaml.safe_dump(k8s.cluster_spec(2, cluster_options(), insecure=True))
    assert "deploy/docker/Dockerfile" in texts and "deploy/kubernetes/daskcluster.yaml" in texts
    for where, text in texts.items():
        assert not REMOVED_COMMAND.search(text), f"{where} calls a removed command: {REMOVED_COMMAND.search(text)[0]}"
    assert REMOVED_COMMAND.search("args: [dask-worker, --name]") and not REMOVED_COMMAND.search("ssa-dask-scheduler")


def containers(resource: dict) -> dict[str, dict]:
    return {c["name"]: c for path in POD_PATHS[resource["kind"]] for c in at(resource, path)["containers"]}


@pytest.mark.parametrize("resource", [manifest("daskcluster.yaml")[0], manifest("daskjob.yaml")[0],
                                      k8s.cluster_spec(2, cluster_options())], ids=["daskcluster", "daskjob", "generated"])
def test_pods_run_dask_scheduler_and_dask_worker_over_tls(resource):
    by_name = containers(resource)
    assert by_name["scheduler"]["args"][:2] == ["dask", "scheduler"]
    assert by_name["scheduler"]["args"][2:4] == ["--protocol", "tls"]
    assert by_name["worker"]["args"][:3] == ["dask", "worker", "$(DASK_SCHEDULER_ADDRESS)"]
    worker_env = {e["name"]: e["value"] for e in by_name["worker"]["env"]}
    assert re.fullmatch(r"tls://[a-z0-9-]+-scheduler:8786", worker_env["DASK_SCHEDULER_ADDRESS"])
    # the worker's address names the Service of this very cluster (the operator names it <cluster>-scheduler)
    cluster_name = resource["metadata"]["name"]
    assert worker_env["DASK_SCHEDULER_ADDRESS"] == f"tls://{cluster_name}-scheduler:8786"
    if resource["kind"] == "DaskJob":
        assert "$(DASK_SCHEDULER_ADDRESS)" in by_name["job"]["args"]
        assert by_name["job"]["args"][:2] == ["ssa-dask", "align"]


def test_daskcluster_yaml_is_what_scheduler_kubernetes_creates():
    (shipped,) = manifest("daskcluster.yaml")
    assert shipped == k8s.cluster_spec(shipped["spec"]["worker"]["replicas"], cluster_options())


def test_daskjob_cluster_is_the_generated_spec_under_the_jobs_name():
    (job,) = manifest("daskjob.yaml")
    options = {**cluster_options(), "name": job["metadata"]["name"]}
    replicas = job["spec"]["cluster"]["spec"]["worker"]["replicas"]
    assert job["spec"]["cluster"] == {"spec": k8s.cluster_spec(replicas, options)["spec"]}
    pod = dict(job["spec"]["job"]["spec"])
    assert pod.pop("restartPolicy") == "Never"
    container = {k: v for k, v in pod["containers"][0].items() if k not in ("env", "volumeMounts")}
    assert pod == k8s.pod_template(container, options, role="job", insecure=False)


def pod_specs(resource: dict) -> list[dict]:
    return [at(resource, path) for path in POD_PATHS[resource["kind"]]]


@pytest.mark.parametrize("resource", [manifest("daskcluster.yaml")[0], manifest("daskjob.yaml")[0],
                                      k8s.cluster_spec(2, cluster_options())], ids=["daskcluster", "daskjob", "generated"])
def test_tls_from_the_secret_in_every_pod(resource):
    for pod in pod_specs(resource):
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert TLS_ENV <= set(env)
        assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "true"
        for name in TLS_ENV - {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"}:
            assert env[name] in {f"{k8s.TLS_MOUNT_PATH}/{f}" for f in k8s.TLS_FILES.values()}
        assert env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"].endswith("/ca.crt")
        assert all(env[f"DASK_DISTRIBUTED__COMM__TLS__{r}__KEY"].endswith("/tls.key") for r in ("SCHEDULER", "WORKER", "CLIENT"))
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["tls"] == {"name": "tls", "mountPath": k8s.TLS_MOUNT_PATH, "readOnly": True}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"] == {"secretName": "ssa-dask-tls", "defaultMode": 0o440}
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"] == 1000


def test_tls_env_names_are_distributed_config_keys():
    """Each variable maps to a key of distributed's config schema (a typo would be ignored silently)."""
    import dask.config
    import distributed  # noqa: F401  (loads distributed.yaml defaults)

    for name in TLS_ENV:
        collected = dask.config.collect_env({name: "x"})
        key = name.removeprefix("DASK_").lower().replace("__", ".").replace("_", "-")
        assert dask.config.get(key, default="missing") != "missing", name
        assert collected  # the variable is picked up by dask's config
    schema = yaml.safe_load((Path(distributed.__file__).parent / "distributed-schema.yaml").read_text())
    tls = schema["properties"]["distributed"]["properties"]["comm"]["properties"]["tls"]["properties"]
    assert {"ca-file", "scheduler", "worker", "client"} <= set(tls)
    assert set(tls["worker"]["properties"]) >= {"cert", "key"}


def test_insecure_spec_has_no_tls():
    spec = k8s.cluster_spec(2, cluster_options(), insecure=True)
    for pod in pod_specs(spec):
        (container,) = pod["containers"]
        names = {e["name"] for e in container.get("env", [])}
        assert not names & TLS_ENV
        assert "tls" not in {v["name"] for v in pod.get("volumes", [])}
        assert "tls" not in {m["name"] for m in container.get("volumeMounts", [])}
    by_name = containers(spec)
    assert by_name["scheduler"]["args"][2:4] == ["--protocol", "tcp"]
    worker_env = {e["name"]: e["value"] for e in by_name["worker"]["env"]}
    assert worker_env["DASK_SCHEDULER_ADDRESS"] == "tcp://ssa-dask-scheduler:8786"


def test_options_shape_the_spec():
    spec = k8s.cluster_spec(
        5,
        {"name": "atlas", "image": "reg.site/ssa:1", "tls_secret": "my-tls", "volume_claim": None,
         "resources": {"limits": {"cpu": "2", "memory": "4Gi"}}, "env": {"OMP_NUM_THREADS": 1}},
    )
    assert all_errors(spec) == []
    by_name = containers(spec)
    assert {c["image"] for c in by_name.values()} == {"reg.site/ssa:1"}
    assert by_name["worker"]["resources"] == {"limits": {"cpu": "2", "memory": "4Gi"}}
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in by_name["worker"]["env"]
    assert spec["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == "atlas"
    for pod in pod_specs(spec):
        assert [v["name"] for v in pod["volumes"]] == ["tls"]
        assert pod["volumes"][0]["secret"]["secretName"] == "my-tls"
    assert {"name": "DASK_SCHEDULER_ADDRESS", "value": "tls://atlas-scheduler:8786"} in by_name["worker"]["env"]
    with pytest.raises(SSAInputError, match="unknown Kubernetes cluster option.*'n_worker'"):
        k8s.cluster_spec(2, {"n_worker": 3})
    with pytest.raises(SSAInputError, match="n_workers"):
        k8s.cluster_spec(0, {})


def test_generated_yaml_has_no_anchors():
    text = yaml.safe_dump(k8s.cluster_spec(2, cluster_options()))
    assert "&id" not in text and "*id" not in text


# --- TLS credentials ---------------------------------------------------------------------------


def test_tls_files_make_a_working_mutual_tls_pair(tmp_path):
    paths = k8s.write_tls_files(tmp_path / "tls")
    assert {p.name for p in paths.values()} == {"ca.crt", "tls.crt", "tls.key"}
    assert paths["key"].stat().st_mode & 0o777 == 0o600
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=paths["ca"])
    server.load_cert_chain(paths["cert"], paths["key"])
    before = paths["cert"].read_text()
    k8s.write_tls_files(tmp_path / "tls")  # kept: a re-run must not lock out a running cluster
    assert paths["cert"].read_text() == before
    paths["key"].unlink()
    with pytest.raises(SSAInputError, match="only some of"):
        k8s.write_tls_files(tmp_path / "tls")


def test_tls_secret_command_prints_the_files(tmp_path, capsys):
    assert k8s.main(["tls-secret", str(tmp_path / "t"), "--name", "site-tls"]) == 0
    secret = yaml.safe_load(capsys.readouterr().out)
    assert secret["metadata"]["name"] == "site-tls"
    assert secret["stringData"]["tls.crt"] == (tmp_path / "t" / "tls.crt").read_text()
    assert builtin_errors(secret) == []


# --- errors a user without a cluster gets ------------------------------------------------------


@pytest.fixture
def no_kube(monkeypatch, tmp_path):
    """No kubeconfig anywhere and not inside a pod."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)


@pytest.mark.parametrize("insecure", [False, True])
def test_missing_kubeconfig_is_a_cluster_error(no_kube, tmp_path, insecure):
    k8s.write_tls_files(tmp_path / "tls")
    with pytest.raises(SSAClusterError, match="cannot reach a Kubernetes API server.*no-such-kubeconfig"):
        with k8s.kubernetes_cluster(1, {"client_tls_dir": str(tmp_path / "tls")}, insecure=insecure):
            pass


def test_unreachable_api_server_is_a_cluster_error(no_kube, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{port}", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "default"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with pytest.raises(SSAClusterError, match="cannot reach a Kubernetes API server.*Connect"):
        with k8s.kubernetes_cluster(1, {}, insecure=True):
            pass


def test_missing_client_credentials_fail_before_the_cluster_is_touched(no_kube, tmp_path, monkeypatch):
    for name in TLS_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SSAClusterError, match="no credentials.*client_tls_dir"):
        with k8s.kubernetes_cluster(1, {}):
            pass
    with pytest.raises(SSAClusterError, match=r"client_tls_dir: missing .*ca\.crt"):
        with k8s.kubernetes_cluster(1, {"client_tls_dir": str(tmp_path / "empty")}):
            pass


def test_client_credentials_from_the_dask_config(monkeypatch, tmp_path):
    import dask

    paths = k8s.write_tls_files(tmp_path / "tls")
    with dask.config.set({"distributed.comm.tls.ca-file": str(paths["ca"]),
                          "distributed.comm.tls.client.cert": str(paths["cert"])}):
        assert k8s.client_tls_config({}) == {}
    config = k8s.client_tls_config({"client_tls_dir": str(tmp_path / "tls")})
    assert config["distributed.comm.tls.client.key"] == str(paths["key"])
    assert config["distributed.comm.require-encryption"] is True


# --- against a stand-in API server: what is created, and the reasons a start fails ----------------


class FakeKubeAPI:
    """Just enough of the Kubernetes API for kr8s, over HTTP (aiohttp, in a thread): records every
    request, serves the ``pods`` and ``events`` it is given (filtered by label selector), answers
    the DaskCluster POST with ``create_status``, and forwards a pod port (the websocket protocol of
    ``kubectl port-forward``) to ``forward_to`` on 127.0.0.1, where a test runs the real scheduler."""

    def __init__(self, pods: list[dict], create_status: int = 201, events: list[dict] = (), forward_to: int = 0):
        import asyncio
        import threading

        from aiohttp import WSMsgType, web

        self.requests: list[tuple[str, str, dict | None]] = []
        ns = "/api/v1/namespaces/default"

        def status(code: int, message: str) -> web.Response:
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                                      "message": message}, status=code)

        def selected(request: web.Request) -> list[dict]:
            wanted = dict(kv.split("=") for kv in request.query.get("labelSelector", "").split(",") if kv)
            return [p for p in pods if wanted.items() <= p["metadata"]["labels"].items()]

        async def get(request: web.Request) -> web.StreamResponse:
            self.requests.append(("GET", request.path_qs, None))
            path = request.path.rstrip("/")
            resources = [{"name": n, "singularName": n[:-1], "namespaced": True, "kind": k, "verbs": ["get", "list"]}
                         for n, k in (("pods", "Pod"), ("events", "Event"), ("services", "Service"))]
            by_name = {p["metadata"]["name"]: p for p in pods}
            if path == "/version":
                return web.json_response({"major": "1", "minor": "30", "gitVersion": "v1.30.0"})
            if path == "/api":
                return web.json_response({"kind": "APIVersions", "versions": ["v1"]})
            if path == "/apis":
                return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
            if path == "/api/v1":
                return web.json_response({"kind": "APIResourceList", "groupVersion": "v1", "resources": resources})
            if path == f"{ns}/pods":
                return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": selected(request)})
            if path == f"{ns}/events":
                return web.json_response({"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": list(events)})
            service = {"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "ssa-dask-scheduler", "namespace": "default"},
                       "spec": {"selector": {"dask.org/cluster-name": "ssa-dask", "dask.org/component": "scheduler"},
                                "ports": [{"name": "tcp-comm", "port": 8786}]}}
            if path == f"{ns}/services":
                return web.json_response({"kind": "ServiceList", "apiVersion": "v1", "metadata": {}, "items": [service]})
            if path == f"{ns}/services/ssa-dask-scheduler":
                return web.json_response(service)
            name = path.removeprefix(f"{ns}/pods/").removesuffix("/portforward")
            if path.endswith("/portforward") and name in by_name and forward_to:
                return await port_forward(request)
            if path.startswith(f"{ns}/pods/") and name in by_name:
                return web.json_response(by_name[name])
            return status(404, f"the server could not find {request.path}")

        async def port_forward(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
            await ws.prepare(request)
            reader, writer = await asyncio.open_connection("127.0.0.1", forward_to)
            port = int(request.query["ports"]).to_bytes(2, "little")
            await ws.send_bytes(b"\x00" + port)  # the protocol opens the data and error channels
            await ws.send_bytes(b"\x01" + port)

            async def to_client():
                while data := await reader.read(65536):
                    await ws.send_bytes(b"\x00" + data)
                await ws.close()

            relay = asyncio.ensure_future(to_client())
            async for message in ws:
                if message.type != WSMsgType.BINARY:
                    break
                writer.write(message.data[1:])
                await writer.drain()
            relay.cancel()
            writer.close()
            return ws

        async def post(request: web.Request) -> web.Response:
            body = await request.json()
            self.requests.append(("POST", request.path, body))
            if create_status >= 400:
                return status(create_status, f"refused with {create_status}")
            return web.json_response(body, status=create_status)

        async def delete(request: web.Request) -> web.Response:
            self.requests.append(("DELETE", request.path, None))
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})

        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", get)
        app.router.add_route("POST", "/{tail:.*}", post)
        app.router.add_route("DELETE", "/{tail:.*}", delete)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}],
        }))
        return path

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def scheduler_pod(status: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "status": status,
            "metadata": {"name": "ssa-dask-scheduler-abc", "namespace": "default",
                         "labels": {"dask.org/cluster-name": "ssa-dask", "dask.org/component": "scheduler"}}}


IMAGE_PULL = scheduler_pod({"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}],
                            "containerStatuses": [{"name": "scheduler", "ready": False, "state": {"waiting": {
                                "reason": "ImagePullBackOff",
                                "message": 'Back-off pulling image "registry.example.org/ssa-dask:0.1.0"'}}}]})
CREATING = scheduler_pod({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
                          "containerStatuses": [{"name": "scheduler", "ready": False,
                                                 "state": {"waiting": {"reason": "ContainerCreating"}}}]})
MISSING_SECRET = {"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": "FailedMount",
                  "metadata": {"name": "ssa-dask-scheduler-abc.1", "namespace": "default"},
                  "involvedObject": {"kind": "Pod", "name": "ssa-dask-scheduler-abc"},
                  "message": 'MountVolume.SetUp failed for volume "tls" : secret "ssa-dask-tls" not found'}
UNSCHEDULABLE = scheduler_pod({"phase": "Pending", "conditions": [{
    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
    "message": "0/3 nodes are available: 3 Insufficient memory."}]})


@pytest.fixture
def fake_api(no_kube, monkeypatch, tmp_path):
    """``fake_api(pods, create_status)``: a running FakeKubeAPI that KUBECONFIG points at."""
    started = []

    pytest.importorskip("aiohttp", reason="aiohttp not installed (comes with dask-kubernetes)")

    def start(pods: list[dict], create_status: int = 201, events: list[dict] = (), forward_to: int = 0) -> FakeKubeAPI:
        fake = FakeKubeAPI(pods, create_status, events, forward_to)
        started.append(fake)
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / f"kubeconfig-{len(started)}")))
        return fake

    yield start
    for fake in started:
        fake.stop()


@pytest.mark.parametrize(
    "pods,events,timeout,expected",
    [
        ([IMAGE_PULL], [], 60, r"did not start: ssa-dask-scheduler-abc: ImagePullBackOff: Back-off pulling image "
                               r"\"registry\.example\.org/ssa-dask:0\.1\.0\""),
        ([UNSCHEDULABLE], [], 1, "Unschedulable: 0/3 nodes are available: 3 Insufficient memory"),
        ([CREATING], [MISSING_SECRET], 1, r"FailedMount: MountVolume.SetUp failed .* secret \"ssa-dask-tls\" not found"),
        ([], [], 1, "no scheduler pod was created: is the Dask operator running"),
    ],
    ids=["image-pull", "unschedulable", "missing-secret", "no-operator"],
)
def test_failed_start_gives_kubernetes_reason_and_deletes_the_cluster(fake_api, tmp_path, pods, events, timeout, expected):
    fake = fake_api(pods, events=events)
    k8s.write_tls_files(tmp_path / "tls")
    options = {**cluster_options(), "client_tls_dir": str(tmp_path / "tls")}
    with pytest.raises(SSAClusterError, match=expected):
        with k8s.kubernetes_cluster(2, options, timeout=timeout):
            pytest.fail("the context must not be entered")
    (created,) = [body for method, _, body in fake.requests if method == "POST"]
    expected_spec = k8s.cluster_spec(2, options)  # exactly the validated spec, TLS included
    expected_spec["metadata"]["namespace"] = "default"  # the kubeconfig's namespace
    assert created == expected_spec
    assert ("DELETE", "/apis/kubernetes.dask.org/v1/namespaces/default/daskclusters/ssa-dask", None) in fake.requests


@pytest.mark.parametrize("status,hint", [(404, "CRDs installed"), (409, "kubectl delete daskcluster ssa-dask")])
def test_refused_creation_is_explained(fake_api, status, hint):
    fake = fake_api([], create_status=status)
    with pytest.raises(SSAClusterError, match=f"refused DaskCluster 'ssa-dask': refused with {status}.*{hint}"):
        with k8s.kubernetes_cluster(1, {}, insecure=True):
            pytest.fail("the context must not be entered")
    assert not [r for r in fake.requests if r[0] == "DELETE"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tls_dask(tmp_path):
    """A real ``dask scheduler --protocol tls`` and one ``dask worker`` on 127.0.0.1, configured from
    the environment as daskcluster.yaml configures the pods (paths to the TLS files); stopped by PID.
    Yields (scheduler port, TLS directory)."""
    import os
    import signal
    import socket
    import subprocess
    import time

    tls = tmp_path / "tls"
    k8s.write_tls_files(tls)
    env = {e["name"]: e["value"].replace(k8s.TLS_MOUNT_PATH, str(tls)) for e in k8s._tls_env()}
    env = {**os.environ, **env}
    port = _free_port()
    scheduler = subprocess.Popen(
        ["dask", "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", "127.0.0.1:0"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = subprocess.Popen(
        ["dask", "worker", f"tls://127.0.0.1:{port}", "--nthreads", "1", "--no-dashboard", "--name", "w0"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # the pod would not be Ready before the scheduler listens
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert scheduler.poll() is None and time.monotonic() < deadline, "the TLS scheduler did not start"
            time.sleep(0.2)
        yield port, tls
    finally:
        for process in (worker, scheduler):
            process.send_signal(signal.SIGTERM)
        for process in (worker, scheduler):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


READY_SCHEDULER = scheduler_pod({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"},
                                                                   {"type": "ContainersReady", "status": "True"}]})
PENDING_WORKER = {"apiVersion": "v1", "kind": "Pod", "status": {"phase": "Pending", "conditions": [{
    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
    "message": "0/3 nodes are available: 3 Insufficient cpu."}]},
    "metadata": {"name": "ssa-dask-default-worker-2", "namespace": "default",
                 "labels": {"dask.org/cluster-name": "ssa-dask", "dask.org/component": "worker"}}}


def test_scheduler_kubernetes_runs_an_alignment_over_tls(fake_api, tls_dask, counts_problem):
    """connect("kubernetes") as the CLI calls it: the DaskCluster is created, the scheduler reached
    through kr8s' port forward with the client credentials, the alignment equals the local one,
    and the cluster is deleted at the end."""
    import ssa_dask
    from ssa_dask.cluster import connect

    port, tls = tls_dask
    fake = fake_api([READY_SCHEDULER], forward_to=port)
    sc, spots = counts_problem
    options = {**cluster_options(), "client_tls_dir": str(tls), "timeout": 60}
    with connect("kubernetes", n_workers=1, cluster_options=options) as executor:
        assert executor.client.scheduler.address.startswith("tls://127.0.0.1:")  # the port forward
        assert executor.client.scheduler.address != f"tls://127.0.0.1:{port}"
        assert list(executor.client.scheduler_info()["workers"].values())[0]["name"] == "w0"
        result = ssa_dask.align(sc, spots, client=executor.client, block_rows=75)
        assert not [r for r in fake.requests if r[0] == "DELETE"]
    direct = ssa_dask.align(sc, spots, client=None, block_rows=75)
    for name in set(direct.data_vars) - {"column_potential"}:
        np.testing.assert_array_equal(result[name].values, direct[name].values, err_msg=name)
    # the spots' potential is summed over the blocks in the order they arrive: equal to rounding
    np.testing.assert_allclose(ssa_dask.column_potential(result), ssa_dask.column_potential(direct), rtol=1e-12)
    assert ("DELETE", "/apis/kubernetes.dask.org/v1/namespaces/default/daskclusters/ssa-dask", None) in fake.requests
    assert any("/pods/ssa-dask-scheduler-abc/portforward" in path for _, path, _ in fake.requests)


def test_workers_that_never_join_are_explained(fake_api, tls_dask):
    port, tls = tls_dask
    fake = fake_api([READY_SCHEDULER, PENDING_WORKER], forward_to=port)
    options = {**cluster_options(), "client_tls_dir": str(tls)}
    with pytest.raises(SSAClusterError, match=r"3 Dask worker\(s\) of 'ssa-dask' did not join .*"
                                              r"ssa-dask-default-worker-2: Unschedulable: 0/3 nodes are available: 3 Insufficient cpu"):
        with k8s.kubernetes_cluster(3, options, timeout=5):
            pytest.fail("the context must not be entered")
    assert ("DELETE", "/apis/kubernetes.dask.org/v1/namespaces/default/daskclusters/ssa-dask", None) in fake.requests
