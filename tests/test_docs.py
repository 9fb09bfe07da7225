"""The manual: README.md stays a short front page, and docs/ builds with `mkdocs build --strict`.

The strict build is what catches a link to a page or an anchor that no longer exists; the nav
check catches a page written but never reachable (MkDocs only warns about it as "omitted", which
the strict build also fails on, but this names the page).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300


def nav_pages(nav: object) -> set[str]:
    """Every page file the nav names, however deeply its sections nest."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, list):
        return {page for item in nav for page in nav_pages(item)}
    if isinstance(nav, dict):
        return {page for value in nav.values() for page in nav_pages(value)}
    return set()


def mkdocs_config() -> dict[str, object]:
    """mkdocs.yml read as plain YAML: it uses no `!!python` tags, so the safe loader reads it all."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert isinstance(config, dict)
    return config


def mkdocs_command() -> list[str]:
    """The venv's mkdocs; missing fails in CI (a skipped docs build would hide broken links)."""
    for candidate in (Path(sys.executable).parent / "mkdocs", ROOT / ".venv" / "bin" / "mkdocs"):
        if candidate.exists():
            return [str(candidate)]
    found = shutil.which("mkdocs")
    if found:
        return [found]
    if os.environ.get("CI") == "true":
        pytest.fail("mkdocs is not installed (make docs installs pyproject's `docs` extra)")
    pytest.skip("mkdocs is not installed (make docs installs pyproject's `docs` extra)")


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_page_is_in_the_nav() -> None:
    listed = nav_pages(mkdocs_config()["nav"])
    pages = {path.relative_to(ROOT / "docs").as_posix() for path in (ROOT / "docs").rglob("*.md")}
    assert pages - listed == set(), "pages missing from mkdocs.yml's nav"
    assert listed - pages == set(), "mkdocs.yml's nav names pages that do not exist"


def test_docs_build_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [*mkdocs_command(), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").exists()
