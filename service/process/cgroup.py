"""Where this process's cgroup lives, and how to read its files: shared by the CPU and memory budgets.

A controller's limit may be set on this process's cgroup or on any ancestor (a container's, its
pod's), and inside a container the mount may already be the container's own cgroup while
/proc/self/cgroup still shows the host's path: `up_from` walks from the deepest candidate to the
mount so both cases are covered. Everything here takes its root and /proc file as parameters,
so the readers are tested on fake trees (tests/cgroupfake.py).

This module is a leaf: it imports nothing from the service.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def controller_paths(self_cgroup: Path) -> dict[str, str]:
    """Map each controller in /proc/self/cgroup to its path; the v2 unified entry is keyed ''."""
    paths: dict[str, str] = {}
    for line in (read(self_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def up_from(mount: Path, path: str) -> Iterator[Path]:
    """The cgroup directory of this process under `mount`, then each parent up to `mount`.

    Inside a container the cgroup namespace (or a bind mount) makes `mount` itself the
    container's cgroup, while /proc/self/cgroup may still show the host's path; walking up
    covers both, and a limit set on any ancestor binds this process too.
    """
    rel = Path(path.lstrip("/"))
    seen = set()
    for candidate in [rel, *rel.parents]:
        directory = mount / candidate
        if directory not in seen:
            seen.add(directory)
            yield directory
