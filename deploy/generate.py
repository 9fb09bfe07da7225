"""Every generated file of the tree, from its one source, with one command:

    python -m deploy.generate                  # (re)write every generated file, remove obsolete ones
    python -m deploy.generate --check          # exit 1, naming them, if any is stale; write nothing
    python -m deploy.generate --runbook-base https://wiki.example.com/runbook   # alerts link there

Each generator renders the files it owns (`render() -> dict[Path, str]`) without reading what
another one wrote, so they can run in any order and one check covers them all:

- deploy.grafana.dashboards: the Grafana dashboards' JSON (deploy/grafana/dashboards/*.json);
- deploy.k8s: the generated files of k8s/ and the kustomization that packages the dashboards'
  JSON as ConfigMaps (deploy/grafana/dashboards/kustomization.yaml);
- deploy.reference: the reference pages of docs/reference/, from the settings' declarations.

`--runbook-base` (or RUNBOOK_BASE_URL) points the alerts' runbook_url annotations of the
PrometheusRule at a published copy of docs/runbook.md; without it they keep the repository's
path. The rule files themselves are never changed. A base makes `--check` fail on the committed
PrometheusRule, as it should: the check is of the tree as committed.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python -m deploy.generate"
RUNBOOK_BASE_ENV = "RUNBOOK_BASE_URL"

Files = dict[Path, str]


def _none(files: Mapping[Path, str]) -> list[Path]:
    return []


@dataclass(frozen=True)
class Generator:
    """A module's files: what it renders, and which files it owns that it would no longer write."""

    name: str
    render: Callable[[], Files]
    obsolete: Callable[[Mapping[Path, str]], list[Path]] = _none


def _optional(name: str) -> ModuleType | None:
    """A generator module that may not be in the tree yet (only its own absence is tolerated)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


def generators(runbook_base: str | None = None) -> list[Generator]:
    # Imported here, not at the top: the generators' own CLIs use sync() from this module.
    from deploy import k8s
    from deploy.grafana import dashboards

    found = [
        Generator("deploy.grafana.dashboards", dashboards.render, dashboards.obsolete),
        Generator("deploy.k8s", functools.partial(k8s.render, runbook_base=runbook_base), k8s.obsolete),
    ]
    reference = _optional("deploy.reference")
    if reference is not None:
        found.append(Generator("deploy.reference", reference.render))
    return found


def render(chosen: Sequence[Generator]) -> Files:
    """Every file the generators write; a file claimed by two of them is an error."""
    files: Files = {}
    owner: dict[Path, str] = {}
    for generator in chosen:
        for path, text in generator.render().items():
            if path in owner:
                raise ValueError(f"{_shown(path)} is written by both {owner[path]} and {generator.name}")
            owner[path] = generator.name
            files[path] = text
    return files


def _shown(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def stale(files: Mapping[Path, str]) -> list[Path]:
    """The files missing or different on disk."""
    return [path for path, text in files.items() if not path.is_file() or path.read_text() != text]


def sync(chosen: Sequence[Generator], check: bool, command: str = COMMAND) -> int:
    """Write what is stale and remove what is obsolete, or with `check` only name them (exit 1)."""
    files = render(chosen)
    changed = stale(files)
    extra = [path for generator in chosen for path in generator.obsolete(files)]
    if check:
        if changed or extra:
            names = ", ".join(_shown(path) for path in [*changed, *extra])
            print(f"out of date: {names} (run {command})", file=sys.stderr)
            return 1
        return 0
    for path in changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[path])
        print(f"wrote {_shown(path)}")
    for path in extra:
        path.unlink()
        print(f"removed {_shown(path)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true",
                        help="exit 1, naming them, if generated files are stale; write nothing")
    parser.add_argument("--runbook-base", metavar="URL", default=os.environ.get(RUNBOOK_BASE_ENV) or None,
                        help=f"where the alerts' runbook links point (env {RUNBOOK_BASE_ENV}; "
                             "default: docs/runbook.md of the repository)")
    args = parser.parse_args(argv)
    return sync(generators(args.runbook_base), args.check)


if __name__ == "__main__":
    sys.exit(main())
