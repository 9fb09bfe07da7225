"""A fake cgroup mount and /proc/self/cgroup, built under tmp_path, for the tests of what
service.process.cpus (the CPU quota) and service.process.memguard (the memory limit) read from the machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

Host = TypeVar("Host", bound="CgroupHost")


def write(path: Path, text: str) -> None:
    """One cgroup file (and its directories), as the kernel shows it: the value and a newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


@dataclass
class CgroupHost:
    """A fake cgroup mount (`root`) and the process's membership file (`self_cgroup`).

    Each test module adds the files of its own controller in a subclass."""

    root: Path
    self_cgroup: Path

    @classmethod
    def under(cls: type[Host], tmp_path: Path) -> Host:
        root = tmp_path / "sys" / "fs" / "cgroup"
        root.mkdir(parents=True)
        return cls(root=root, self_cgroup=tmp_path / "proc-self-cgroup")

    def member_of(self, *lines: str) -> None:
        """Write /proc/self/cgroup, e.g. "0::/app" (v2) or "4:memory:/app" (v1)."""
        self.self_cgroup.write_text("".join(line + "\n" for line in lines))
