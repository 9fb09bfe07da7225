"""The CPU budget read from fake cgroup trees: v2, v1, hybrid, containers, affinity and rounding.

Each test builds a fake /sys/fs/cgroup (`root`) and a fake /proc/self/cgroup under tmp_path and
passes explicit `cores` and `affinity`, so nothing depends on the machine running the tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cgroupfake import CgroupHost, write

from service.process.cpus import CpuBudget, cgroup_quota, cpu_budget

APP = "/user.slice/app.service"  # the process's own cgroup in most tests
V1_CPU = "4:cpu,cpuacct:"  # a v1 /proc/self/cgroup line's prefix for the cpu controller


class FakeHost(CgroupHost):
    """The fake cgroup tree, with this module's files."""

    def cpu_max(self, cgroup: str, value: str) -> None:
        """A cgroup v2 `cpu.max` ("quota period" or "max period") in `cgroup` under the root."""
        write(self.root / cgroup.lstrip("/") / "cpu.max", value)

    def cfs(self, cgroup: str, quota: int, period: int = 100_000, mount: str = "cpu,cpuacct") -> None:
        """cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us` in `cgroup` under the v1 `mount`."""
        directory = self.root / mount / cgroup.lstrip("/")
        write(directory / "cpu.cfs_quota_us", str(quota))
        write(directory / "cpu.cfs_period_us", str(period))

    def quota(self) -> tuple[float, str] | None:
        return cgroup_quota(self.root, self.self_cgroup)

    def budget(self, cores: int = 8, affinity: int = 8) -> CpuBudget:
        return cpu_budget(self.root, self.self_cgroup, cores=cores, affinity=affinity)


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost.under(tmp_path)


# -- cgroup v2 -----------------------------------------------------------------------------------


def test_v2_quota_of_one_and_a_half_cpus_forks_two_workers(host: FakeHost) -> None:
    host.member_of(f"0::{APP}")
    host.cpu_max(APP, "150000 100000")

    budget = host.budget(cores=8, affinity=8)

    assert budget.workers == 2
    assert budget.quota == 1.5
    assert (budget.cores, budget.affinity) == (8, 8)
    assert "cgroup v2" in budget.reason and "cpu.max" in budget.reason
    assert APP.lstrip("/") in budget.reason  # names the directory the limit was read from


@pytest.mark.parametrize(
    ("cores", "affinity", "workers", "said"), [(8, 8, 8, "8 cores"), (8, 4, 4, "CPU affinity allows 4")]
)
def test_v2_unlimited_falls_back_to_cores_and_affinity(
    host: FakeHost, cores: int, affinity: int, workers: int, said: str
) -> None:
    host.member_of(f"0::{APP}")
    host.cpu_max(APP, "max 100000")

    budget = host.budget(cores=cores, affinity=affinity)

    assert host.quota() is None
    assert budget.quota is None
    assert budget.workers == workers
    assert said in budget.reason


@pytest.mark.parametrize(
    ("parent", "child", "expected", "found_in"),
    [
        ("200000 100000", "400000 100000", 2.0, "user.slice/cpu.max"),  # parent is tighter
        ("400000 100000", "300000 100000", 3.0, "app.service/cpu.max"),  # child is tighter
        ("250000 100000", "max 100000", 2.5, "user.slice/cpu.max"),  # only an ancestor limits
    ],
)
def test_v2_tightest_limit_on_the_cgroup_path_wins(
    host: FakeHost, parent: str, child: str, expected: float, found_in: str
) -> None:
    host.member_of(f"0::{APP}")
    host.cpu_max("/user.slice", parent)
    host.cpu_max(APP, child)

    quota = host.quota()

    assert quota is not None
    assert quota[0] == expected
    assert quota[1].endswith(found_in)


@pytest.mark.parametrize(
    "membership",
    [
        "0::/",  # private cgroup namespace: the container's cgroup is the root
        "0::/system.slice/docker-abc.scope",  # host path shown, but only the container's cgroup mounted
    ],
)
def test_v2_container_reads_the_limit_at_the_mount_root(host: FakeHost, membership: str) -> None:
    host.member_of(membership)
    host.cpu_max("/", "150000 100000")

    budget = host.budget(cores=64, affinity=64)

    assert budget.workers == 2
    assert budget.quota == 1.5
    assert str(host.root / "cpu.max") in budget.reason


# -- cgroup v1 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct", "cpuacct,cpu"])
@pytest.mark.parametrize("controllers", ["cpu", "cpu,cpuacct", "cpuacct,cpu"])
def test_v1_cfs_quota_under_each_mount_name(host: FakeHost, mount: str, controllers: str) -> None:
    host.member_of("1:name=systemd:/user.slice", f"4:{controllers}:{APP}", f"7:memory:{APP}")
    host.cfs(APP, quota=150_000, period=100_000, mount=mount)

    budget = host.budget(cores=8, affinity=8)

    assert budget.workers == 2
    assert budget.quota == 1.5
    assert "cgroup v1" in budget.reason and "cfs_quota_us" in budget.reason
    assert f"/{mount}/" in budget.reason


def test_v1_cpu_symlinked_to_cpu_cpuacct(host: FakeHost) -> None:
    host.member_of(V1_CPU + APP)
    host.cfs(APP, quota=300_000, mount="cpu,cpuacct")
    (host.root / "cpu").symlink_to("cpu,cpuacct")

    assert host.budget().workers == 3


def test_v1_quota_minus_one_is_unlimited(host: FakeHost) -> None:
    host.member_of(V1_CPU + APP)
    host.cfs(APP, quota=-1)

    budget = host.budget(cores=6, affinity=6)

    assert host.quota() is None
    assert (budget.workers, budget.quota) == (6, None)
    assert "cores" in budget.reason


def test_v1_limit_on_a_parent_binds_an_unlimited_child(host: FakeHost) -> None:
    host.member_of(V1_CPU + APP)
    host.cfs("/user.slice", quota=200_000)
    host.cfs(APP, quota=-1)

    quota = host.quota()

    assert quota is not None
    assert quota[0] == 2.0
    assert quota[1].endswith("user.slice/cpu.cfs_quota_us")


def test_v1_quota_without_a_period_file_is_ignored(host: FakeHost) -> None:
    host.member_of(V1_CPU + APP)
    write(host.root / "cpu,cpuacct" / APP.lstrip("/") / "cpu.cfs_quota_us", "150000")

    assert host.quota() is None


def test_v1_container_host_path_missing_under_the_mount(host: FakeHost) -> None:
    host.member_of(V1_CPU + "/machine.slice/libpod-abc.scope")
    host.cfs("/", quota=150_000)  # the container sees its own cgroup as the mount root

    assert not (host.root / "cpu,cpuacct" / "machine.slice").exists()
    budget = host.budget(cores=32, affinity=32)

    assert budget.workers == 2
    assert str(host.root / "cpu,cpuacct" / "cpu.cfs_quota_us") in budget.reason


# -- hybrid (v1 cpu controller plus the v2 unified entry) ----------------------------------------


@pytest.mark.parametrize(
    ("v2", "v1_quota", "expected", "source"),
    [
        ("300000 100000", 150_000, 1.5, "cgroup v1"),
        ("150000 100000", 300_000, 1.5, "cgroup v2"),
        ("max 100000", 250_000, 2.5, "cgroup v1"),
    ],
)
def test_hybrid_smallest_quota_wins(
    host: FakeHost, v2: str, v1_quota: int, expected: float, source: str
) -> None:
    host.member_of(f"0::{APP}", V1_CPU + APP, f"1:name=systemd:{APP}")
    host.cpu_max(APP, v2)
    host.cfs(APP, quota=v1_quota)

    quota = host.quota()

    assert quota is not None
    assert quota[0] == expected
    assert quota[1].startswith(source)


# -- affinity, cores, rounding -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpu_max", "cores", "affinity", "workers", "said"),
    [
        (None, 8, 3, 3, "CPU affinity allows 3"),  # affinity below the core count
        ("400000 100000", 8, 3, 3, "CPU affinity allows 3"),  # affinity below the quota
        ("800000 100000", 4, 16, 4, "4 cores"),  # cores below quota and affinity
        ("150000 100000", 8, 3, 2, "cpu.max allows 1.5 CPUs"),  # quota below affinity
    ],
)
def test_smallest_of_quota_affinity_and_cores(
    host: FakeHost, cpu_max: str | None, cores: int, affinity: int, workers: int, said: str
) -> None:
    host.member_of(f"0::{APP}")
    if cpu_max is not None:
        host.cpu_max(APP, cpu_max)

    budget = host.budget(cores=cores, affinity=affinity)

    assert budget.workers == workers
    assert said in budget.reason


@pytest.mark.parametrize(
    ("cpu_max", "workers"),
    [
        ("1000 100000", 1),  # 0.01 CPUs: still one worker
        ("50000 100000", 1),  # 0.5 CPUs
        ("100000 100000", 1),  # exactly 1
        ("220000 100000", 3),  # 2.2 rounds up
        ("300000 100000", 3),  # exactly 3: no extra worker
        ("50000 25000", 2),  # a period other than 100ms
    ],
)
def test_quota_is_rounded_up_to_at_least_one_worker(host: FakeHost, cpu_max: str, workers: int) -> None:
    host.member_of(f"0::{APP}")
    host.cpu_max(APP, cpu_max)

    assert host.budget(cores=8, affinity=8).workers == workers


def test_no_cgroup_files_at_all_uses_cores(host: FakeHost) -> None:
    # neither /proc/self/cgroup nor anything under the mount exists
    budget = host.budget(cores=4, affinity=8)

    assert host.quota() is None
    assert budget == CpuBudget(workers=4, reason="4 cores", cores=4, affinity=8, quota=None)


def test_membership_lines_that_do_not_parse_are_ignored(host: FakeHost) -> None:
    host.member_of("", "garbage", f"0::{APP}")
    host.cpu_max(APP, "200000 100000")

    assert host.budget().workers == 2


def test_no_cpu_information_at_all_gives_one_worker(host: FakeHost) -> None:
    budget = host.budget(cores=0, affinity=0)

    assert budget.workers == 1
    assert "no CPU information" in budget.reason


def test_unreadable_cpu_max_is_no_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpu.max").write_text("abc 100000\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/\n")
    assert cgroup_quota(root, proc) is None
