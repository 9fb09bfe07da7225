"""Soak: churning WebSocket and HTTP clients for a long while, watching each worker's memory, its
file descriptors and the metrics directory.

    python -m loadtests.soak --duration 600          # make soak (D=600)
    python -m loadtests.soak --duration 60 --ws 12   # tests/test_soak.py, what CI runs

**What it starts**, each in a session of its own and all stopped (by process group) before it
exits, on success, failure, Ctrl-C or SIGTERM: the service (`python -m service` on a free
loopback port, 2 workers, its PROMETHEUS_MULTIPROC_DIR a private folder this run watches) and,
unless --direct, Nginx in front of it, configured by the same code `make stack` uses
(loadtests/harness/nginx.py, nginx/render.py) with one Nginx worker. Through Nginx is the default: it costs
little CPU and is how the service runs in production. Prometheus is not needed: the run scrapes
the service's own /metrics.

**Clients** (asyncio in this process, on plain sockets, so nothing between them and the wire
hides an error): WebSockets that open, take ticks (/ws/ticker) or room messages (/ws/chat, each
sends one message and must get it back) for 1.5-5 s, then close (a share of them drop the TCP
connection instead) and are replaced at once; HTTP clients on keep-alive connections (renewed
every 20-300 requests) and on a new connection per request, across /, /api/hello,
/api/sleep?ms=, short /api/poll, /healthz, /readyz and the 404 and 400 paths; long polls (tick
and room); a publisher (POST /api/publish, below the per-address rate limit); and aborters that
kill requests mid-way (a long /api/sleep or /api/poll left after it was sent, half a request
head, half a body, a WebSocket upgrade left before its answer), by FIN or by RST.

**Worker kills**: --kills times (3) between 20% and 50% of the run, the worker with the highest
id is SIGKILLed; the supervisor restarts it. What the kill cuts (the killed worker's sockets and
requests, Nginx's 502 for a POST it does not retry) is counted apart, not as a failure.

**Samples** every --interval seconds: per worker process (psutil) RSS, open fds; the metrics
directory's file count and bytes; the service's /metrics (its RSS and fd gauges, connections,
requests and 5xx, restarts). Before the churn, a warm-up (every request kind, directly) and a
baseline taken idle; after it, the clients close, Nginx stops (so no idle upstream connection is
left open), each worker's fds are read once more, and the service is stopped (SIGTERM; exit 0).

**Verdict** (each rule, and why, is in judging.py): memory flat per worker process, no fd
leak, metrics directory bounded, zero 5xx and zero unexpected client failures, every killed worker
back, and nothing left running. `loadtests/reports/soak/<time>-<D>s.json` (the figures each
rule judged, the clients' counts, the kills, the baseline and final figures; not the samples one by
one, which the console shows as they are taken) and `.md` (the tables); exit code 0 on PASS, 1 on
FAIL, 2 when the run could not start.

**Parts**: options.py (the flags), processes.py (the service and Nginx), wire.py (the asyncio
HTTP/1.1 and WebSocket client), clients.py (the churn), sampling.py (what is read from the
processes and the metrics directory), judging.py (the rules, pure functions of the figures),
run.py (the run: warm-up, baseline, churn, kills, wind-down), report.py (the JSON and Markdown).
"""
