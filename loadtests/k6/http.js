// Plain HTTP at a ramping arrival rate: /api/hello (the cheapest answer) and /api/sleep?ms=SLEEP_MS
// (a non-blocking wait), each its own scenario, ramped up to its peak, held, and ramped down.
//
// Environment (defaults in brackets):
//   BASE_URL     [http://127.0.0.1:8080]  http(s)://host:port
//   RATE         [200]                    peak requests per second, both scenarios together
//   DURATION     [30]                     seconds: 30% ramp up, 60% at the peak, 10% ramp down
//   SLEEP_MS     [100]                    the ms of /api/sleep
//   SLEEP_SHARE  [0.2]                    the share of RATE that goes to /api/sleep (0 leaves it out)
//   MAX_VUS      [auto]                   VUs k6 may start to keep the rate (arrival-rate executors)
//   MAX_ERROR_RATE [0.01]                 threshold on http_req_failed
//   P95_MS       [500]                    threshold on p(95) of /api/hello; /api/sleep gets SLEEP_MS more
//
// Metrics: k6's http_reqs, http_req_failed and http_req_duration, also per scenario
// (`{scenario:hello}`, `{scenario:sleep}`), and dropped_iterations when k6 could not keep the rate.
import http from 'k6/http';
import { BASE_URL, envNumber } from './lib.js';

const RATE = Math.max(1, envNumber('RATE', 200));
const DURATION = Math.max(3, envNumber('DURATION', 30));
const SLEEP_MS = Math.floor(envNumber('SLEEP_MS', 100));
const SLEEP_SHARE = Math.min(1, envNumber('SLEEP_SHARE', 0.2));
const P95_MS = envNumber('P95_MS', 500);

function stages(peak) {
  const up = Math.max(1, Math.round(DURATION * 0.3));
  const down = Math.max(1, Math.round(DURATION * 0.1));
  const hold = Math.max(1, DURATION - up - down);
  return [
    { target: peak, duration: `${up}s` },
    { target: peak, duration: `${hold}s` },
    { target: 0, duration: `${down}s` },
  ];
}

// VUs needed = rate x time per request; a generous guess of that, or MAX_VUS.
function vus(peak, expectedMs) {
  const needed = Math.ceil((peak * (expectedMs + 50)) / 1000);
  const max = Math.floor(envNumber('MAX_VUS', Math.max(20, needed * 4)));
  return { preAllocatedVUs: Math.min(max, Math.max(2, needed)), maxVUs: max };
}

const scenarios = {};
const thresholds = {
  http_req_failed: [`rate<=${envNumber('MAX_ERROR_RATE', 0.01)}`],
  // Per-scenario counts in the summary export (always true):
  'http_reqs{scenario:hello}': ['count>=0'],
};
const helloRate = Math.max(1, Math.round(RATE * (1 - SLEEP_SHARE)));
scenarios.hello = {
  executor: 'ramping-arrival-rate', exec: 'hello', startRate: 0, timeUnit: '1s',
  stages: stages(helloRate), ...vus(helloRate, 10),
};
thresholds['http_req_duration{scenario:hello}'] = [`p(95)<${P95_MS}`];
const sleepRate = Math.round(RATE * SLEEP_SHARE);
if (sleepRate > 0) {
  scenarios.sleep = {
    executor: 'ramping-arrival-rate', exec: 'sleep', startRate: 0, timeUnit: '1s',
    stages: stages(sleepRate), ...vus(sleepRate, SLEEP_MS),
  };
  thresholds['http_req_duration{scenario:sleep}'] = [`p(95)<${SLEEP_MS + P95_MS}`];
  thresholds['http_reqs{scenario:sleep}'] = ['count>=0'];
}

export const options = {
  scenarios,
  thresholds,
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)', 'count'],
};

export function hello() {
  http.get(`${BASE_URL}/api/hello`, { tags: { name: '/api/hello' } });
}

export function sleep() {
  http.get(`${BASE_URL}/api/sleep?ms=${SLEEP_MS}`, { tags: { name: '/api/sleep' } });
}
