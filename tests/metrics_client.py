"""Scrape the real service's /metrics and read samples the way Prometheus would."""

from __future__ import annotations

import time
from collections.abc import Callable

from conftest import ServiceProcess
from prometheus_client.parser import text_string_to_metric_families

Labels = dict[str, str]


class Scrape:
    def __init__(self, text: str, worker: str) -> None:
        self.worker = worker  # the worker that answered this scrape
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels`."""
        return sum(
            s.value for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def series(self, name: str) -> list[Labels]:
        return [s.labels for s in self.samples if s.name == name]


def scrape(svc: ServiceProcess) -> Scrape:
    status, headers, body = svc.request("/metrics")
    assert status == 200, body
    return Scrape(body.decode(), headers["x-worker-id"])


def eventually(svc: ServiceProcess, check: Callable[[Scrape], bool], timeout: float = 10.0) -> Scrape:
    """Scrape until `check` holds (sampled gauges refresh once a second); fail with the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        result = scrape(svc)
        if check(result):
            return result
        if time.monotonic() > deadline:
            samples = "\n".join(map(str, result.samples))
            raise AssertionError(f"metrics never matched; last scrape:\n{samples}")
        time.sleep(0.1)
