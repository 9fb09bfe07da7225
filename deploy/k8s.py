"""Generate the files of k8s/ that are made from a source elsewhere, so that each has one source.

Kustomize loads no file from outside a kustomization's root, and `kubectl kustomize` (plain, no
flags) is how these manifests are rendered; so the Nginx configuration and the Prometheus rules
are rendered into the kustomizations by this module, never copied by hand. The Grafana
dashboards are not copied at all: a folder with a kustomization of its own may be a resource
from anywhere (only plain files are held to the root), so this module writes
deploy/grafana/dashboards/kustomization.yaml beside the JSON, and k8s/base lists that folder.

    python -m deploy.generate                  # (re)write every generated file of the tree
    python -m deploy.generate --check          # exit 1 if a generated file differs
    python -m deploy.k8s [--check]             # this module's files only

What it writes (every `generated/` folder belongs to it: anything else found there is removed):

- k8s/base/generated/nginx.conf: nginx/nginx.conf.template rendered by nginx/render.py with the
  pod's settings (NGINX_SETTINGS: the service on the pod's loopback, the TLS pair and pid under
  /tmp/nginx, X-Forwarded-For believed from the cluster's pod network);
- k8s/overlays/NAME/generated/nginx.conf for an overlay with an `nginx.env` (NAME=VALUE lines,
  the renderer's settings, over NGINX_SETTINGS); the overlay replaces the `nginx-config`
  ConfigMap with it;
- k8s/base/generated/prometheusrule.yaml: a PrometheusRule whose groups are those of
  deploy/prometheus/rules/*.yml, in file order; with a runbook base (`--runbook-base`,
  deploy/runbook.py) the alerts' runbook_url annotations point there instead;
- deploy/grafana/dashboards/kustomization.yaml: one ConfigMap per dashboard of
  deploy/grafana/dashboards.py, labelled for the Grafana sidecar, its data the JSON file itself;
- k8s/components/redis/generated/: the optional Redis of the rooms' backplane (a kustomize
  Component an overlay adds, as k8s/overlays/prod-redis does): its Deployment, Service and
  NetworkPolicy (`redis.yaml`), the service's BROADCAST_URL naming that Service
  (`deployment-patch.yaml`), and the service's NetworkPolicy opened to it and to DNS only
  (`networkpolicy-patch.yaml`). Generated so that the URL, the Service and both policies use
  one name and one port (REDIS_*), and Redis runs with the same flags as in `make stack`.

tests/test_generate.py runs the check; tests/test_k8s.py renders and validates every overlay.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from deploy.generate import RUNBOOK_BASE_ENV, Generator, sync
from deploy.grafana import dashboards as grafana
from deploy.redisconf import REDIS_FLAGS
from nginx import render as nginx_render

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"
COMPONENTS = K8S / "components"
REDIS_COMPONENT = COMPONENTS / "redis"
RULES = ROOT / "deploy" / "prometheus" / "rules"
DASHBOARDS = grafana.DIRECTORY
DASHBOARDS_KUSTOMIZATION = DASHBOARDS / "kustomization.yaml"
GENERATED = "generated"

# The Nginx sidecar: the service is on the pod's loopback; only /tmp is writable (an emptyDir);
# the image's entrypoint makes a TLS pair in /tmp/nginx/tls unless one is mounted. REAL_IP_FROM
# is the cluster's pod network, where the Ingress controller's connections come from: only
# those peers' X-Forwarded-For is believed (an overlay's nginx.env changes it).
NGINX_SETTINGS: dict[str, str] = {
    "UPSTREAM": "127.0.0.1:8888",
    "LISTEN_ADDRESS": "0.0.0.0",
    "HTTP_PORT": "8080",
    "TLS_PORT": "8443",
    "STATUS_PORT": "8081",
    "RUN_DIR": "/tmp/nginx",
    "TLS_CERT": "/tmp/nginx/tls/tls.crt",
    "TLS_KEY": "/tmp/nginx/tls/tls.key",
    "REAL_IP_FROM": "10.0.0.0/8",
}
# Nginx's `worker_processes auto` counts the node's CPUs, not the container's CPU limit: on a
# 64-core node a sidecar limited to half a CPU would start 64 workers. The sidecar runs one
# worker per CPU of its limit, rounded up, like the service (k8s/base/deployment.yaml).
NGINX_CPU_LIMIT = 0.5
NGINX_WORKER_PROCESSES = str(max(1, math.ceil(NGINX_CPU_LIMIT)))

# Labels every generated object carries (the same as the hand-written ones in k8s/base/), and
# the label the Prometheus Operator of kube-prometheus-stack selects rules and monitors by.
LABELS: dict[str, str] = {
    "app.kubernetes.io/name": "tornado-service",
    "app.kubernetes.io/part-of": "tornado",
}
OPERATOR_LABELS: dict[str, str] = {**LABELS, "app.kubernetes.io/component": "monitoring",
                                   "release": "prometheus"}
DASHBOARD_LABELS: dict[str, str] = {**LABELS, "app.kubernetes.io/component": "dashboard",
                                    "grafana_dashboard": "1"}

# The optional Redis (k8s/components/redis): the Service the service's BROADCAST_URL names.
REDIS_NAME = "tornado-redis"
REDIS_PORT = 6379
REDIS_IMAGE = "docker.io/library/redis:7.0.15"  # the Redis of Debian bookworm, which the tests run
REDIS_USER = 999  # the image's `redis` user
REDIS_LABELS: dict[str, str] = {"app.kubernetes.io/name": REDIS_NAME, "app.kubernetes.io/part-of": "tornado",
                                "app.kubernetes.io/component": "broadcast"}
REDIS_SELECTOR: dict[str, str] = {"app.kubernetes.io/name": REDIS_NAME,
                                  "app.kubernetes.io/component": "broadcast"}
SERVICE_SELECTOR: dict[str, str] = {"app.kubernetes.io/name": "tornado-service",
                                    "app.kubernetes.io/component": "server"}
REDIS_URL = f"redis://{REDIS_NAME}:{REDIS_PORT}/0"

_HEADER = ("Generated by `python -m deploy.generate` (deploy/k8s.py) from {source}: do not edit; "
           "edit the source and rerun.")


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=VALUE lines; blank lines and lines starting with # are skipped."""
    settings: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{_relative(path)}:{number}: expected NAME=VALUE, got {raw!r}")
        settings[name.strip()] = value.strip()
    return settings


def nginx_conf(overrides: Mapping[str, str] | None = None) -> str:
    """nginx.conf for the pod: the template rendered with NGINX_SETTINGS (then `overrides`)."""
    settings = {**NGINX_SETTINGS, **(overrides or {})}
    processes_setting = "WORKER_PROCESSES" in nginx_render.DEFAULTS
    if processes_setting:
        settings.setdefault("WORKER_PROCESSES", NGINX_WORKER_PROCESSES)
    # The environment is not read: the output must not depend on who runs the generator.
    text = nginx_render.render(nginx_render.TEMPLATE.read_text(), nginx_render.values(settings, {}))
    if not processes_setting:
        # The template has no setting for it (yet): the one `worker_processes auto;` line is set here.
        text, count = re.subn(r"(?m)^worker_processes auto;$",
                              f"worker_processes {NGINX_WORKER_PROCESSES};", text)
        if count != 1:
            raise ValueError("nginx.conf.template: expected one `worker_processes auto;` line")
    listed = "\n".join(f"#   {name}={value}" for name, value in sorted(settings.items()))
    header = _HEADER.format(source=f"{_relative(nginx_render.TEMPLATE)} (nginx/render.py)")
    return f"# {header}\n# Settings:\n{listed}\n\n{text}"


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (PromQL, descriptions), as in the rule files."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(document: Any) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=10_000, allow_unicode=True)


def rule_files() -> list[Path]:
    return sorted(RULES.glob("*.yml"))


def _runbook() -> ModuleType:
    """deploy/runbook.py, which knows how the rule files' runbook links are written."""
    try:
        return importlib.import_module("deploy.runbook")
    except ModuleNotFoundError as exc:
        if exc.name != "deploy.runbook":
            raise
        raise SystemExit("a runbook base needs deploy/runbook.py, which this tree does not have") from exc


def rule_groups(runbook_base: str | None = None) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in rule_files():
        text = path.read_text()
        if runbook_base is not None and _runbook().anchors(text):  # the alerts; recording rules link nothing
            text = _runbook().with_base(text, runbook_base)
        groups.extend(yaml.safe_load(text)["groups"])
    return groups


def prometheus_rule(runbook_base: str | None = None) -> str:
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "tornado-service", "labels": OPERATOR_LABELS},
        "spec": {"groups": rule_groups(runbook_base)},
    }
    sources = ", ".join(_relative(path) for path in rule_files())
    if runbook_base is not None:
        sources += f" (runbook links under {runbook_base})"
    return f"# {_HEADER.format(source=sources)}\n{_dump(document)}"


def dashboard_files() -> list[Path]:
    """The JSON files deploy/grafana/dashboards.py writes: from its list, not from the disk, so
    that the kustomization does not wait for the JSON to be written first."""
    return [DASHBOARDS / name for name in sorted(grafana.DASHBOARDS)]


def dashboard_configmap_name(path: Path) -> str:
    return f"grafana-dashboard-{path.stem}"


def dashboards_kustomization() -> str:
    """One ConfigMap per dashboard (none nears the 1 MiB limit of one), the JSON file its data."""
    generators = [
        {
            "name": dashboard_configmap_name(path),
            "files": [path.name],
            # No hash suffix: Grafana's sidecar writes each ConfigMap's files into one folder,
            # and when a replaced ConfigMap (old hash) is pruned, it deletes the file the new one
            # wrote. The sidecar watches ConfigMaps, so no rollout is needed for a change.
            "options": {"disableNameSuffixHash": True, "labels": DASHBOARD_LABELS},
        }
        for path in dashboard_files()
    ]
    document = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "configMapGenerator": generators,
    }
    header = _HEADER.format(source="deploy/grafana/dashboards.py's list of dashboards")
    note = ("k8s/base lists this folder as a resource: the dashboards' JSON, without a copy. "
            "Grafana's file provisioning reads only the *.json files here.")
    return f"# {header}\n# {note}\n{_dump(document)}"



def redis_objects() -> str:
    """Redis for the rooms' pub/sub: one pod, nothing on disk, reachable by the service's pods only."""
    probe = {"exec": {"command": ["redis-cli", "ping"]}, "timeoutSeconds": 2}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": REDIS_NAME, "labels": REDIS_LABELS},
        "spec": {
            "replicas": 1,
            # One Redis: a rollout stops the old one first. The service's workers reconnect with
            # backoff and answer publishes 503 meanwhile (README.md, Rooms).
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": REDIS_SELECTOR},
            "template": {
                "metadata": {"labels": REDIS_LABELS},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "redis",
                        "image": REDIS_IMAGE,
                        # protected mode refuses every peer of a Redis without a password: the
                        # NetworkPolicy is what keeps everyone but the service's pods out
                        "args": ["redis-server", "--port", str(REDIS_PORT), *REDIS_FLAGS,
                                 "--protected-mode", "no"],
                        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
                        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"},
                                      "limits": {"cpu": "500m", "memory": "256Mi"}},
                        "readinessProbe": {**probe, "periodSeconds": 5},
                        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
                        "securityContext": {
                            "runAsUser": REDIS_USER, "runAsGroup": REDIS_USER, "runAsNonRoot": True,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }],
                    "volumes": [{"name": "data", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": REDIS_NAME, "labels": REDIS_LABELS},
        "spec": {"selector": REDIS_SELECTOR,
                 "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}]},
    }
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": REDIS_NAME, "labels": REDIS_LABELS},
        "spec": {
            "podSelector": {"matchLabels": REDIS_SELECTOR},
            "policyTypes": ["Ingress", "Egress"],  # no egress rule: Redis calls no one
            "ingress": [{"from": [{"podSelector": {"matchLabels": SERVICE_SELECTOR}}],
                         "ports": [{"port": "redis", "protocol": "TCP"}]}],
        },
    }
    header = _HEADER.format(source="deploy/k8s.py (redis_objects)")
    return f"# {header}\n" + "---\n".join(_dump(doc) for doc in (deployment, service, policy))


def redis_deployment_patch() -> str:
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "tornado-service"},
        "spec": {"template": {"spec": {"containers": [
            {"name": "service", "env": [{"name": "BROADCAST_URL", "value": REDIS_URL}]},
        ]}}},
    }
    return f"# {_HEADER.format(source='deploy/k8s.py (redis_deployment_patch)')}\n{_dump(patch)}"


def redis_networkpolicy_patch() -> str:
    """The service's pods may call out to Redis, and to the cluster DNS to find it; nothing else."""
    egress = [
        {"to": [{"podSelector": {"matchLabels": REDIS_SELECTOR}}],
         "ports": [{"port": REDIS_PORT, "protocol": "TCP"}]},
        {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                 "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
         "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
    ]
    patch = [{"op": "add", "path": "/spec/egress", "value": egress}]
    return f"# {_HEADER.format(source='deploy/k8s.py (redis_networkpolicy_patch)')}\n{_dump(patch)}"


def overlays_with_nginx_settings() -> list[Path]:
    return sorted(path.parent for path in OVERLAYS.glob("*/nginx.env"))


def render(runbook_base: str | None = None) -> dict[Path, str]:
    """Every file this module writes (absolute path) and its content."""
    base = BASE / GENERATED
    files: dict[Path, str] = {
        base / "nginx.conf": nginx_conf(),
        base / "prometheusrule.yaml": prometheus_rule(runbook_base),
        DASHBOARDS_KUSTOMIZATION: dashboards_kustomization(),
    }
    for overlay in overlays_with_nginx_settings():
        files[overlay / GENERATED / "nginx.conf"] = nginx_conf(read_env_file(overlay / "nginx.env"))
    redis = REDIS_COMPONENT / GENERATED
    files[redis / "redis.yaml"] = redis_objects()
    files[redis / "deployment-patch.yaml"] = redis_deployment_patch()
    files[redis / "networkpolicy-patch.yaml"] = redis_networkpolicy_patch()
    return files


def generated_dirs() -> list[Path]:
    return [BASE / GENERATED, *(path / GENERATED for path in sorted(OVERLAYS.glob("*")) if path.is_dir()),
            *(path / GENERATED for path in sorted(COMPONENTS.glob("*")) if path.is_dir())]


def obsolete(files: Mapping[Path, str]) -> list[Path]:
    """Files in a generated folder that would not be written (what was generated once, no more)."""
    return [path for folder in generated_dirs() if folder.is_dir()
            for path in sorted(folder.rglob("*")) if path.is_file() and path not in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a generated file differs; write nothing")
    parser.add_argument("--runbook-base", metavar="URL", default=os.environ.get(RUNBOOK_BASE_ENV) or None,
                        help=f"where the alerts' runbook links point (env {RUNBOOK_BASE_ENV})")
    args = parser.parse_args(argv)
    k8s = Generator("deploy.k8s", functools.partial(render, runbook_base=args.runbook_base), obsolete)
    return sync([k8s], args.check, command="python -m deploy.k8s")


if __name__ == "__main__":
    sys.exit(main())

