"""The house rules of service/, checked: no import circle, leaves that stay leaves, and the two
outside facts the supervisor relies on (Tornado's reports from fork_processes, prometheus-client's
import-time choice of multiprocess mode)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import tornado.process
from conftest import ROOT

from service.supervisor import TornadoChildReports

SERVICE = ROOT / "service"
LEAVES = ("service.metrics", "service.metrics_dir", "service.logs", "service.state", "service.errors",
          "service.requestid", "service.cpus", "service.config")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def service_imports() -> dict[str, set[str]]:
    """module -> the service modules it imports (anywhere in the file, TYPE_CHECKING blocks too)."""
    modules = {module_name(p): p for p in SERVICE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if candidate in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("service"))
        graph[name] = {m for m in found if m != name and m != "service"}
    return graph


def test_service_has_no_import_circle() -> None:
    graph = service_imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "import circle: " + " -> ".join([*path[path.index(module):], module])
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_leaves_import_nothing_of_the_service_but_other_leaves() -> None:
    graph = service_imports()
    for leaf in LEAVES:
        assert graph[leaf] <= {"service", *LEAVES}, f"{leaf} imports {graph[leaf] - set(LEAVES)}"


def test_handlers_do_not_know_the_application() -> None:
    graph = service_imports()
    for module, imported in graph.items():
        if module.startswith("service.handlers"):
            assert "service.app" not in imported and "service.worker" not in imported, module
    assert "service.app" not in graph["service.ticker"] and "service.metrics" not in graph["service.ticker"]


def test_tornado_reports_child_deaths_as_the_supervisor_reads_them() -> None:
    """The supervisor learns deaths inside fork_processes from its log records: pin their shape."""
    source = inspect.getsource(tornado.process.fork_processes)
    for format_string in (TornadoChildReports.STARTING, *TornadoChildReports.REPORTS):
        assert f'"{format_string}"' in source, f"Tornado no longer logs {format_string!r} in fork_processes"
    assert source.count("gen_log.") >= len(TornadoChildReports.REPORTS)  # the logger the filter sits on
    assert tornado.process.gen_log.name == "tornado.general"


def test_metrics_directory_must_be_prepared_before_prometheus_client() -> None:
    script = "import prometheus_client\nfrom service import metrics_dir\nmetrics_dir.prepare({})\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "imported before the metrics directory was prepared" in result.stderr
