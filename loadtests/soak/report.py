"""What a soak leaves: one JSON file (the figures every rule judged, the clients' counts, the kills,
the idle baseline and final figures) and one Markdown file (the tables), named by the time it
started and its duration.

The JSON is what a reader compares runs by, so it keeps figures and drops the rest: not the
samples one by one (the console shows each as it is taken), not the service's log events (their
count by level and event is kept), only the first Nginx error lines and how many there were.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from loadtests.soak.common import ROOT
from loadtests.soak.run import Soak

NGINX_ERRORS_KEPT = 5


def build(
    soak: Soak,
    args: argparse.Namespace,
    argv: list[str] | None,
    when: datetime,
    source: dict[str, Any],
    checks: dict[str, Any],
    verdict: str,
) -> dict[str, Any]:
    """The report's JSON: what the rules judged and the counts behind them."""
    assert soak.clients is not None
    return {
        "verdict": verdict,
        "when": f"{when:%Y-%m-%d %H:%M:%S} UTC",
        "duration_s": args.duration,
        "churn_s": round(soak.churn_seconds, 1),
        "target": (
            f"through Nginx (1 worker) to the service ({args.workers} workers)"
            if not args.direct
            else f"directly to the service ({args.workers} workers)"
        ),
        "command": "python -m loadtests.soak " + " ".join(sys.argv[1:] if argv is None else argv),
        "revision": source,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "checks": checks,
        "clients": {k: dict(v) for k, v in soak.clients.counts.items()},
        "server_requests": (soak.final_metrics or {}).get("requests", 0),
        "samples_taken": len(soak.samples),
        "service_log": {
            "access_lines": soak.service.access_lines,
            "non_json_lines": soak.service.bad_lines[:20],
            "lines_by_level_and_event": [
                [level, event, n]
                for (level, event), n in Counter(
                    (str(e.get("level")), str(e.get("event"))) for e in soak.service.events
                ).most_common(40)
            ],
        },
        "nginx_errors": len(soak.nginx_errors),
        "nginx_errors_first": soak.nginx_errors[:NGINX_ERRORS_KEPT],
        "kills": [asdict(k) for k in soak.kills],
        "baseline": soak.baseline,
        "final": soak.final,
        "notes": soak.notes,
    }  # fmt: skip


def write(result: dict[str, Any], reports: Path, stamp: str) -> tuple[Path, Path]:
    reports.mkdir(parents=True, exist_ok=True)
    json_path = reports / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_path = reports / f"{stamp}.md"
    md_path.write_text(markdown(result))
    return json_path, md_path


def markdown(result: dict[str, Any]) -> str:
    c = result["checks"]
    lines = [
        f"# Soak, {result['duration_s']:g} s: {result['verdict']}",
        "",
        f"{result['when']}; {result['target']}; command `{result['command']}`; commit "
        f"{result['revision'].get('commit', '?')[:12]}"
        + (
            f" with changes in {len(result['revision']['changed'])} service file(s)"
            if result["revision"].get("changed")
            else ""
        )
        + ".",
        "",
        "| check | verdict | figures |",
        "| --- | --- | --- |",
    ]
    mem = c["memory"]
    judged = [p for p in mem["processes"] if "growth_mib" in p]
    lines.append(
        f"| memory flat per worker | {_ok(mem)} | "
        + "; ".join(
            f"w{p['slot']} pid {p['pid']} ({p['from']:.0f}-{p['to']:.0f} s): {p['middle_median_mib']} -> "
            f"{p['last_median_mib']} MiB ({p['growth_mib']:+.2f}, limit {p['limit_mib']})"
            for p in judged
        )
        + " |"
    )
    fds = c["fds"]
    lines.append(
        f"| no fd leak | {_ok(fds)} | "
        + "; ".join(
            f"{'w' if r['slot'] != 'supervisor' else ''}{r['slot']}: {r['baseline']} -> peak {r['peak']} -> "
            f"{r['final']}"
            for r in fds["rows"]
        )
        + f" (margin {fds['margin']}) |"
    )
    md = c["metrics_dir"]
    lines.append(
        f"| metrics directory bounded | {_ok(md)} | {md['baseline_files']} files at the baseline, "
        f"{md['end_files']} at the end (bound {md['end_bound']}: +{md['kept_per_restart']} kept per "
        f"restart), at most {md['max_files']}; {(md['end_bytes'] or 0) / 1024:.0f} KiB "
        f"({(md['end_allocated'] or 0) / 1024:.0f} KiB allocated); live gauges of dead workers left: "
        f"{len(md['live_gauges_left'])} |"
    )
    er = c["errors"]
    cut = ", ".join(f"{kind} {n}" for kind, n in er.get("cut_by_kills_by_kind", {}).items()) or "none"
    lines.append(
        f"| zero 5xx, zero unexpected failures | {_ok(er)} | service 5xx: "
        f"{er['service_5xx_seen_by_clients']} seen, {er['service_5xx_in_metrics']} counted; unexpected "
        f"failures {er['unexpected_failures']}; cut by the kills {er['cut_by_kills']} "
        f"({cut}; Nginx 5xx "
        f"{er['proxy_5xx_seen_by_clients']}) |"
    )
    rs = c["restarts"]
    lines.append(
        f"| killed worker back | {_ok(rs)} | {rs['kills']} SIGKILLs, {rs['restarted']} back after "
        f"{rs['back_after_s']} s, {rs['restarts_in_metrics']} in tornado_worker_restarts_total |"
    )
    cl = c["cleanup"]
    lines.append(
        f"| clean stop, nothing left | {_ok(cl)} | service exit {cl['service_exit']}, Nginx exit "
        f"{cl['nginx_exit']}, processes left {cl['left']} |"
    )
    lines += [
        "",
        "| clients | ok | aborted by the client | retried | failed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, counts in sorted(result["clients"].items()):
        lines.append(
            f"| {kind} | {counts.get('ok', 0):,} | {counts.get('aborted', 0):,} | "
            f"{counts.get('retried', 0):,} | {counts.get('failed', 0):,} |"
        )
    lines += ["", f"Server: {result['server_requests']:,.0f} HTTP requests counted in /metrics.", ""]
    if result["notes"]:
        lines += ["Notes:", *(f"- {n}" for n in result["notes"]), ""]
    return "\n".join(lines)


def revision() -> dict[str, Any]:
    """The commit this ran on, and which files the service is made of differed from it."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "service", "nginx", "deploy"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head.stdout.strip(), "changed": dirty.stdout.splitlines()}


def _ok(check: dict[str, Any]) -> str:
    return "PASS" if check["passed"] else "**FAIL**"
