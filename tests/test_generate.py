"""deploy/generate.py: every generated file of the tree is what its generator writes, and the
command that says so names what is stale and what is obsolete."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from deploy import generate, k8s
from deploy.grafana import dashboards


def test_every_generated_file_is_up_to_date() -> None:
    env = {k: v for k, v in os.environ.items() if k != generate.RUNBOOK_BASE_ENV}  # the committed links
    result = subprocess.run([sys.executable, "-m", "deploy.generate", "--check"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_generators_own_disjoint_files_and_copy_none() -> None:
    chosen = generate.generators()
    assert {"deploy.grafana.dashboards", "deploy.k8s"} <= {g.name for g in chosen}
    files = generate.render(chosen)  # raises on a file claimed twice
    assert set(dashboards.render()) <= set(files) and set(k8s.render()) <= set(files)
    texts = [text for path, text in files.items() if path.suffix == ".json"]
    assert len(texts) == len(set(texts)), "a generated file is a copy of another"


def test_check_names_stale_and_obsolete_files_and_a_run_fixes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh, changed, old = tmp_path / "fresh.txt", tmp_path / "sub" / "changed.txt", tmp_path / "old.txt"
    fresh.write_text("fresh\n")
    old.write_text("no generator writes this any more\n")

    def obsolete(files: object) -> list[Path]:
        return [old] if old.exists() else []

    chosen = [generate.Generator("test", lambda: {fresh: "fresh\n", changed: "new\n"}, obsolete)]
    assert generate.sync(chosen, check=True) == 1
    message = capsys.readouterr().err
    assert str(changed) in message and str(old) in message and str(fresh) not in message
    assert not changed.exists() and old.exists()  # --check writes nothing
    assert generate.sync(chosen, check=False) == 0
    assert changed.read_text() == "new\n" and not old.exists()
    assert generate.sync(chosen, check=True) == 0


def test_a_file_two_generators_claim_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "both.txt"
    chosen = [generate.Generator("one", lambda: {path: "1"}), generate.Generator("two", lambda: {path: "2"})]
    with pytest.raises(ValueError, match="both one and two"):
        generate.render(chosen)


def test_a_runbook_base_rewrites_only_the_prometheus_rules_links() -> None:
    pytest.importorskip("deploy.runbook")
    base = "https://docs.example.org/runbook/"
    rule = k8s.BASE / "generated" / "prometheusrule.yaml"
    plain, rebased = k8s.render(), k8s.render(runbook_base=base)
    assert {path for path in plain if plain[path] != rebased[path]} == {rule}
    links = [line.split("runbook_url:", 1)[1].strip() for line in rebased[rule].splitlines()
             if "runbook_url:" in line]
    assert links and all(link.startswith(base + "#") for link in links)
    assert base not in plain[rule]
