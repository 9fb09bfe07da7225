// Non-blocking waits against blocking work, at the same concurrency.
//
// Phase `sleep`: C clients, each sending GET /api/sleep?ms=S again as soon as the last one was
// answered, for DURATION seconds. The waits overlap on the event loop, so the throughput should
// come close to C / (S / 1000) requests per second while the service's CPU stays low.
// Phase `compute` (after a pause of PAUSE seconds): the same C clients on
// /api/compute?n=COMPUTE_N, CPU-bound work that blocks its worker's loop; throughput falls to
// about workers / (time of one compute), and the event-loop lag metric shows the blocking.
//
// Many clients per VU (http.asyncRequest), so VUS VUs run C clients.
//
// Environment (defaults in brackets):
//   BASE_URL    [http://127.0.0.1:8080]  http(s)://host:port
//   C           [50]                     concurrent clients in each phase
//   S           [100]                    ms of each /api/sleep
//   COMPUTE_N   [200000]                 n of each /api/compute (0 leaves the phase out)
//   DURATION    [10]                     seconds of each phase
//   PAUSE       [3]                      seconds between the phases
//   VUS         [ceil(C / 100)]          VUs the clients are spread over
//   MAX_ERRORS  [0]                      threshold: failed requests, both phases together
//
// Metrics: sleep_requests and compute_requests (Counters of requests answered within the phase's
// DURATION; those still in flight at its end are answered but not counted here), sleep_duration
// and compute_duration (Trends, ms), nonblocking_errors (Counter), and k6's http_req_* metrics.
// Throughput of a phase = its count / DURATION; the runner sets it against C / (S / 1000).
import http from 'k6/http';
import { Counter, Trend } from 'k6/metrics';
import { BASE_URL, envNumber } from './lib.js';

const C = Math.max(1, Math.floor(envNumber('C', 50)));
const S = Math.floor(envNumber('S', 100));
const COMPUTE_N = Math.floor(envNumber('COMPUTE_N', 200000));
const DURATION = Math.max(1, envNumber('DURATION', 10));
const PAUSE = envNumber('PAUSE', 3);
const VUS = Math.min(C, Math.max(1, Math.floor(envNumber('VUS', Math.ceil(C / 100)))));
const PER_VU = Math.ceil(C / VUS);

const phase = (name, startS) => ({
  executor: 'per-vu-iterations', exec: name, vus: VUS, iterations: 1, startTime: `${startS}s`,
  maxDuration: `${Math.ceil(DURATION + 90)}s`, gracefulStop: '60s',
});
const scenarios = { sleep: phase('sleep', 0) };
const thresholds = {
  nonblocking_errors: [`count<=${envNumber('MAX_ERRORS', 0)}`],
  sleep_requests: ['count>=0'], // always true: the count is in the summary export even at 0
};
if (COMPUTE_N > 0) {
  scenarios.compute = phase('compute', DURATION + PAUSE);
  thresholds.compute_requests = ['count>=0'];
}

export const options = {
  scenarios,
  batch: PER_VU + 10,
  batchPerHost: PER_VU + 10,
  thresholds,
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)', 'count'],
};

const counts = { sleep: new Counter('sleep_requests'), compute: new Counter('compute_requests') };
const durations = { sleep: new Trend('sleep_duration', true), compute: new Trend('compute_duration', true) };
const errors = new Counter('nonblocking_errors');

function share(vu) {
  const base = Math.floor(C / VUS);
  return base + ((vu - 1) % VUS < C % VUS ? 1 : 0);
}

async function client(name, url, stopAt) {
  while (Date.now() < stopAt) {
    const res = await http.asyncRequest('GET', url, null, { timeout: '120s', tags: { name } });
    if (res.status !== 200) {
      errors.add(1, { phase: name, status: String(res.status) });
      continue;
    }
    durations[name].add(res.timings.duration);
    if (Date.now() <= stopAt) counts[name].add(1); // throughput counts what the phase's time answered
  }
}

async function run(name, url) {
  const stopAt = Date.now() + DURATION * 1000;
  const clients = [];
  for (let i = 0; i < share(__VU); i++) clients.push(client(name, url, stopAt));
  await Promise.all(clients);
}

export async function sleep() {
  await run('sleep', `${BASE_URL}/api/sleep?ms=${S}`);
}

export async function compute() {
  await run('compute', `${BASE_URL}/api/compute?n=${COMPUTE_N}`);
}
