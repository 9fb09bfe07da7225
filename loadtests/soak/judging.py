"""The soak's verdict, rule by rule: pure functions of the figures a run collected (its samples,
the idle baseline and final figures, the kills, the clients' failures), so that each rule can be
tried on made-up figures without starting anything. Each returns a dict with "passed" and the
figures it judged, which the report shows as they are.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from loadtests.soak.clients import Failure
from loadtests.soak.common import MIB
from loadtests.soak.sampling import Kill


def attribute_failures(failures: list[Failure], kills: list[Kill]) -> None:
    """A failure is the kill's doing when it was on the killed worker (its pid known), or, pid
    unknown, within the kill's window: from just before the SIGKILL until 2 s after the
    replacement started (a connection reset, Nginx's 502 for a POST it may not retry)."""
    for failure in failures:
        for kill in kills:
            end = kill.t + (kill.back_after if kill.back_after is not None else 30.0) + 2.0
            on_killed = failure.pid == kill.pid and failure.t >= kill.t - 0.5
            in_window = failure.pid is None and kill.t - 0.5 <= failure.t <= end
            if on_killed or in_window:
                failure.cause = "worker kill"


def judge_memory(
    samples: list[dict[str, Any]],
    final: dict[str, Any],
    churn_seconds: float,
    interval: float,
    workers: int,
    rss_growth_mib: float,
    rss_growth_pct: float,
) -> dict[str, Any]:
    """Flat memory, per worker process: the median RSS of the last third of its life in the churn
    against the median of the middle third; the first third is warm-up (arenas, caches and
    buffers filling). Growth may be at most `rss_growth_mib` MiB (--rss-growth-mib) or
    `rss_growth_pct` % (--rss-growth-pct) of the middle third, whichever is more. Medians ignore
    single spikes; a leak grows every third by its rate times a third of the life: in the
    10-minute run a worker serves about 17,000 requests and 1,500 WebSockets a third, so 4 MiB
    catches about 250 bytes a request or 3 KiB a WebSocket. A process lives too briefly to judge
    when it had less than a quarter of the run or 9 samples (a worker killed early); each worker
    slot's last process lives at least half the run and must be judged."""
    lives: dict[int, list[tuple[float, int, int]]] = defaultdict(list)  # pid -> (t, rss, slot)
    for row in samples:
        if row["t"] > churn_seconds:
            continue
        for slot, w in row["workers"].items():
            lives[w["pid"]].append((row["t"], w["rss"], int(slot)))
    processes = []
    judged_pids: set[int] = set()
    last_pid = {int(s): w["pid"] for s, w in final.get("workers", {}).items()}
    passed = True
    for pid, points in lives.items():
        slot = points[0][2]
        span = points[-1][0] - points[0][0]
        entry: dict[str, Any] = {
            "slot": slot,
            "pid": pid,
            "from": points[0][0],
            "to": points[-1][0],
            "samples": len(points),
        }
        if span < max(0.25 * churn_seconds, 9 * interval) or len(points) < 9:
            entry["verdict"] = "too short to judge"
            if last_pid.get(slot) == pid:
                passed = False
                entry["verdict"] = "FAIL: the slot's last process too short to judge"
            processes.append(entry)
            continue
        start = points[0][0]
        thirds: list[list[int]] = [[], [], []]
        for t, rss, _ in points:
            thirds[min(2, int(3 * (t - start) / span))].append(rss)
        middle, last = statistics.median(thirds[1]), statistics.median(thirds[2])
        growth = last - middle
        limit = max(rss_growth_mib * MIB, rss_growth_pct / 100 * middle)
        ok = growth <= limit
        passed &= ok
        judged_pids.add(pid)
        entry.update(
            first_median_mib=round(statistics.median(thirds[0]) / MIB, 2),
            middle_median_mib=round(middle / MIB, 2),
            last_median_mib=round(last / MIB, 2),
            growth_mib=round(growth / MIB, 2),
            limit_mib=round(limit / MIB, 2),
            slope_mib_per_min=round(
                _slope([(t, r) for t, r, _ in points if t >= start + span / 3]) * 60 / MIB, 3
            ),
            verdict="flat" if ok else "FAIL: grew",
        )
        processes.append(entry)
    # Every slot's last process (the one serving at the end) must have been judged.
    missing = sorted(slot for slot in range(workers) if last_pid.get(slot) not in judged_pids)
    if missing:
        passed = False
    return {
        "passed": passed,
        "processes": sorted(processes, key=lambda p: (p["slot"], p["from"])),
        "slots_not_judged": missing,
    }


def judge_fds(
    samples: list[dict[str, Any]], baseline: dict[str, Any], final: dict[str, Any], margin: int
) -> dict[str, Any]:
    """No fd leak: once the clients have closed and Nginx has stopped, each worker's open fds are
    back within `margin` (--fd-margin) of the baseline taken idle after the warm-up (a restarted worker is
    compared with its slot's baseline: it is forked from the same supervisor, with the same
    inherited descriptors and the same lazily opened files), no TCP connection is left in it, and
    the supervisor's fds are back at its own baseline."""
    rows = []
    passed = True
    peaks: dict[str, int] = defaultdict(int)
    for row in samples:
        for slot, w in row["workers"].items():
            peaks[slot] = max(peaks[slot], w["fds"])
    for slot, base in sorted(baseline.get("workers", {}).items()):
        end = final.get("workers", {}).get(slot, {})
        ok = (
            end.get("fds") is not None
            and base.get("fds") is not None
            and end["fds"] <= base["fds"] + margin
            and end.get("tcp_connections") == 0
        )
        passed &= ok
        rows.append(
            {
                "slot": slot,
                "baseline_pid": base.get("pid"),
                "baseline": base.get("fds"),
                "peak": peaks.get(slot),
                "final_pid": end.get("pid"),
                "final": end.get("fds"),
                "final_tcp_connections": end.get("tcp_connections"),
                "passed": ok,
            }
        )
    sup_base, sup_end = baseline.get("supervisor", {}), final.get("supervisor", {})
    sup_ok = (
        sup_end.get("fds") is not None
        and sup_base.get("fds") is not None
        and sup_end["fds"] <= sup_base["fds"] + margin
    )
    passed &= sup_ok
    rows.append(
        {
            "slot": "supervisor",
            "baseline_pid": sup_base.get("pid"),
            "baseline": sup_base.get("fds"),
            "peak": max((r["supervisor"] or {}).get("fds", 0) for r in samples) if samples else None,
            "final_pid": sup_end.get("pid"),
            "final": sup_end.get("fds"),
            "final_tcp_connections": None,
            "passed": sup_ok,
        }
    )
    return {"passed": passed, "margin": margin, "rows": rows}


def judge_metrics_dir(
    samples: list[dict[str, Any]], baseline: dict[str, Any], final: dict[str, Any], kills: list[Kill]
) -> dict[str, Any]:
    """Bounded, as service/telemetry/metrics_dir.py promises: a dead worker's live gauges go (the
    supervisor marks it dead), its counters and histograms stay (so rate() never goes backwards) until the
    next start, and MAX_RESTARTS bounds how many dead workers there can be. So the file count
    may grow by the kept files of each restart and by nothing else (not with traffic, not with
    time): at every sample it is at most the baseline plus the kept files of the kills so far,
    no live-gauge file of a killed worker is left, and the files do not swell (bytes per file at
    the end at most twice the baseline's: one growth of prometheus-client's mmap at most, which
    happens only with new label values, and those are bounded)."""
    base = baseline.get("metrics_dir", {})
    base_files, base_bytes = base.get("files", 0), base.get("bytes", 0)
    over = []
    for row in samples:
        kept = sum(len(k.kept) for k in kills if k.t <= row["t"])
        bound = base_files + kept
        if row["metrics_dir"]["files"] > bound:
            over.append({"t": row["t"], "files": row["metrics_dir"]["files"], "bound": bound})
    end = final.get("metrics_dir", {})
    end_bound = base_files + sum(len(k.kept) for k in kills)
    live_left = [n for k in kills for n in k.live_left]
    per_file_base = base_bytes / base_files if base_files else 0
    per_file_end = end.get("bytes", 0) / end["files"] if end.get("files") else 0
    swelled = per_file_base and per_file_end > 2 * per_file_base
    kept_per_restart = max((len(k.kept) for k in kills), default=0)
    passed = not over and not live_left and not swelled and end.get("files", 0) <= end_bound
    return {
        "passed": passed,
        "baseline_files": base_files,
        "baseline_bytes": base_bytes,
        "end_files": end.get("files"),
        "end_bytes": end.get("bytes"),
        "end_allocated": end.get("allocated"),
        "end_bound": end_bound,
        "max_files": max((r["metrics_dir"]["files"] for r in samples), default=0),
        "max_bytes": max((r["metrics_dir"]["bytes"] for r in samples), default=0),
        "kept_per_restart": kept_per_restart,
        "kept_bytes_per_restart": max((k.kept_bytes for k in kills), default=0),
        "at_max_restarts_100": base_files + 100 * kept_per_restart,
        "samples_over_bound": over[:20],
        "live_gauges_left": live_left,
        "bytes_per_file": [round(per_file_base), round(per_file_end)],
    }


def judge_errors(
    failures: list[Failure], service_5xx: int, proxy_5xx: int, final_metrics: dict[str, Any] | None
) -> dict[str, Any]:
    """Zero 5xx from the service (as the clients saw them, and as its own http_requests_total counts
    them) and zero unexpected client failures; what the client aborted itself is no failure, and
    what the kills cut is counted apart (Nginx retries idempotent requests on another worker;
    a WebSocket or a POST in flight on the killed worker is lost, as a crash may)."""
    unexpected = [f for f in failures if f.cause == "unexpected"]
    by_kill = [f for f in failures if f.cause == "worker kill"]
    kinds = Counter(f"{f.kind}: {f.error}" for f in by_kill)
    metrics_5xx = (final_metrics or {}).get("requests_5xx")
    passed = not unexpected and service_5xx == 0 and metrics_5xx == 0
    return {
        "passed": passed,
        "service_5xx_seen_by_clients": service_5xx,
        "service_5xx_in_metrics": metrics_5xx,
        "proxy_5xx_seen_by_clients": proxy_5xx,
        "unexpected_failures": len(unexpected),
        "cut_by_kills": len(by_kill),
        "cut_by_kills_by_kind": dict(kinds),
        "first_unexpected": [asdict(f) for f in unexpected[:30]],
        "cut_by_kills_list": [asdict(f) for f in by_kill[:30]],
    }


def judge_restarts(
    kills: list[Kill], planned: int, final_metrics: dict[str, Any] | None, deaths_logged: int
) -> dict[str, Any]:
    """Every kill was followed by a replacement (logged "worker started", serving) and counted in
    tornado_worker_restarts_total; the supervisor logged each death."""
    restarted = sum(1 for k in kills if k.new_pid is not None)
    counted = (final_metrics or {}).get("restarts")
    died = deaths_logged
    passed = restarted == len(kills) == planned and counted == len(kills) == died
    return {
        "passed": passed,
        "kills": len(kills),
        "restarted": restarted,
        "restarts_in_metrics": counted,
        "deaths_logged": died,
        "back_after_s": [k.back_after for k in kills],
    }


def _slope(points: Iterable[tuple[float, int]]) -> float:
    """Least-squares bytes per second (for the report; the verdict uses medians)."""
    pts = list(points)
    if len(pts) < 2:
        return 0.0
    mean_t = sum(t for t, _ in pts) / len(pts)
    mean_r = sum(r for _, r in pts) / len(pts)
    var = sum((t - mean_t) ** 2 for t, _ in pts)
    return sum((t - mean_t) * (r - mean_r) for t, r in pts) / var if var else 0.0
