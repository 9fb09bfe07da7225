"""Prometheus on this machine: its configuration and command line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def prometheus_config(jobs: dict[str, str], interval: str = "5s", rule_files: Sequence[Path] = ()) -> str:
    """prometheus.yml with one job per target; the service is scraped directly, never via Nginx."""
    lines = ["global:", f"  scrape_interval: {interval}", f"  evaluation_interval: {interval}"]
    if rule_files:
        lines += ["rule_files:", *(f"  - '{path}'" for path in rule_files)]
    lines.append("scrape_configs:")
    for job, target in jobs.items():
        lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: ['{target}']"]
    return "\n".join(lines) + "\n"


def prometheus_command(config: Path, data: Path, listen: str) -> list[str]:
    return ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}",
            f"--web.listen-address={listen}", "--storage.tsdb.retention.time=2d", "--log.level=warn"]
