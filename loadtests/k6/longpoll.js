// N long-poll clients: each waits on GET /api/poll, and polls again the moment an answer comes.
//
// Many clients per VU (http.asyncRequest: one VU keeps many requests in flight), so VUS VUs run N
// clients. A 200 carries the next tick, {"type": "tick", "seq": n, "ts": <server's unix time,
// seconds>, ...}: its delivery latency is receive time - ts, the same figure as the WebSocket
// scenario's. A 204 means the poll's `timeout` passed without a tick.
//
// Environment (defaults in brackets):
//   BASE_URL      [http://127.0.0.1:8080]  http(s)://host:port
//   POLL_PATH     [/api/poll]              the long-poll path
//   N             [100]                    concurrent clients
//   RATE          [100]                    clients started per second (spread evenly over the VUs)
//   D             [10]                     seconds every client keeps polling after the last one started
//   POLL_TIMEOUT  [30]                     the poll's `timeout` query parameter, seconds
//   VUS           [ceil(N / 500)]          VUs the clients are spread over (at most N)
//   MAX_ERRORS    [0]                      threshold: polls answered with neither 200 nor 204
//
// Metrics: polls_200, polls_204, poll_errors (Counters, the last tagged `status`), ticks_received,
// poll_clients_started (Counters), tick_latency (Trend, ms), and k6's own http_req_* metrics.
// (No count of missed ticks: each worker numbers its own ticks, and a client's polls may each go
// to another worker.)
import http from 'k6/http';
import { Counter, Trend } from 'k6/metrics';
import { BASE_URL, envNumber, shareOf } from './lib.js';

const POLL_TIMEOUT = envNumber('POLL_TIMEOUT', 30);
const URL = `${BASE_URL}${__ENV.POLL_PATH || '/api/poll'}?timeout=${POLL_TIMEOUT}`;
const N = Math.max(1, Math.floor(envNumber('N', 100)));
const RATE = Math.max(0.001, envNumber('RATE', 100));
const D = envNumber('D', 10);
const VUS = Math.min(N, Math.max(1, Math.floor(envNumber('VUS', Math.ceil(N / 500)))));
const RAMP_S = N / RATE;
const STOP_AT_S = RAMP_S + D; // after its start, each VU starts no new poll past this time
const PER_VU = Math.ceil(N / VUS);

export const options = {
  scenarios: {
    longpoll: {
      executor: 'per-vu-iterations',
      vus: VUS,
      iterations: 1,
      maxDuration: `${Math.ceil(STOP_AT_S + POLL_TIMEOUT + 60)}s`,
      gracefulStop: '30s',
    },
  },
  // Keep one connection per client between polls: k6's idle pool is `batch`/`batchPerHost` wide.
  batch: PER_VU + 10,
  batchPerHost: PER_VU + 10,
  thresholds: {
    poll_errors: [`count<=${envNumber('MAX_ERRORS', 0)}`],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)', 'count'],
};

const polls200 = new Counter('polls_200');
const polls204 = new Counter('polls_204');
const pollErrors = new Counter('poll_errors');
const clientsStarted = new Counter('poll_clients_started');
const ticksReceived = new Counter('ticks_received');
const tickLatency = new Trend('tick_latency', true);


const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function client(startDelayMs, stopAt) {
  await sleep(startDelayMs);
  clientsStarted.add(1);
  while (Date.now() < stopAt) {
    const res = await http.asyncRequest('GET', URL, null, {
      timeout: `${POLL_TIMEOUT + 30}s`,
      tags: { name: 'poll' },
      responseCallback: http.expectedStatuses(200, 204),
    });
    const received = Date.now();
    if (res.status === 204) {
      polls204.add(1);
      continue;
    }
    if (res.status !== 200) {
      pollErrors.add(1, { status: String(res.status) });
      await sleep(100); // an error answers at once: do not spin on it
      continue;
    }
    polls200.add(1);
    let tick;
    try {
      tick = JSON.parse(res.body);
    } catch (_) {
      continue;
    }
    if (!tick || tick.type !== 'tick' || typeof tick.ts !== 'number') continue;
    ticksReceived.add(1);
    tickLatency.add(received - tick.ts * 1000);
  }
}

export default async function () {
  const mine = shareOf(N, VUS, __VU);
  const start = Date.now();
  const stopAt = start + STOP_AT_S * 1000;
  const clients = [];
  for (let i = 0; i < mine; i++) clients.push(client((i / mine) * RAMP_S * 1000, stopAt));
  await Promise.all(clients);
}
