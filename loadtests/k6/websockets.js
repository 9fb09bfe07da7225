// Open N WebSockets at RATE per second, hold every one of them D seconds once all are open, close.
//
// Many sockets per VU (k6/experimental/websockets: one event loop per VU drives all of them), so
// VUS VUs hold N sockets. Every socket reads the server's ticks, JSON messages
// {"type": "tick", "seq": n, "ts": <server's unix time, seconds>, ...}, and measures the fan-out
// latency as receive time - ts. Any server that sends such ticks can be measured (the shootout does).
//
// Environment (defaults in brackets):
//   BASE_URL   [http://127.0.0.1:8080]  http(s)://host:port; the scheme becomes ws(s)://
//   WS_PATH    [/ws/ticker]             path of the ticker socket
//   N          [100]                    sockets
//   RATE       [100]                    new sockets per second (spread evenly over the VUs)
//   D          [10]                     seconds every socket is held after the last one opened
//   VUS        [ceil(N / 500)]          VUs the sockets are spread over (at most N)
//   MAX_CONNECT_FAILURES   [0]          threshold: sockets that failed to open, or were still not
//                                       open when the hold ended
//   MAX_UNEXPECTED_CLOSES  [0]          threshold: sockets closed by anyone but this client
//   TICK_P95_MS            [unset]      threshold on tick_latency p(95), when set
//   HOLD_MARGIN_S          [2]          tick_latency_held counts ticks received from N/RATE + this
//                                       many seconds after the scenario's start
//   LATENCY_SAMPLE         [1]          share of the sockets whose ticks feed tick_latency and
//                                       tick_latency_held (every socket still counts its ticks
//                                       and gaps): 0.1 measures every tenth socket, which keeps
//                                       k6's own cost per tick down when it holds tens of thousands
//
// Metrics: ws_connect_time (Trend, ms: new WebSocket() to open), ws_sockets_opened,
// ws_connect_failures, ws_unexpected_closes (tagged `code`: the close code the server sent, or
// `none`: k6 1.1.0 reports no code for a server's 1000 or 1001 close, nor for a reset),
// ws_errors (every error event but those after this client's own close), ws_errors_after_close
// (k6's "close sent" and the like once this client had closed: not a failure), ticks_received,
// ticks_missed (gaps in a socket's `seq`), tick_latency (Trend, ms: every tick, the connect ramp's
// included), tick_latency_held (Trend, ms: only the ticks received once the ramp is over for every
// VU, i.e. from the scenario's start + N/RATE + HOLD_MARGIN_S: the latency with all N connected).
// All Counters but the Trends. ticks_received and ticks_missed are added up in each VU and handed
// to k6 once a second (and at the close), not once per tick: a k6 metric sample per tick per socket
// cost k6 more CPU than everything else it does for that tick. Several k6 processes sharing one run each get N and RATE in the same
// proportion, so N/RATE, and so the held phase, is the same in each.
import { Counter, Trend } from 'k6/metrics';
import { WebSocket } from 'k6/experimental/websockets';
import exec from 'k6/execution';
import { BASE_URL, envNumber, holdSockets, shareOf } from './lib.js';

const WS_URL = BASE_URL.replace(/^http/, 'ws') + (__ENV.WS_PATH || '/ws/ticker');
const N = Math.max(1, Math.floor(envNumber('N', 100)));
const RATE = Math.max(0.001, envNumber('RATE', 100));
const D = envNumber('D', 10);
const VUS = Math.min(N, Math.max(1, Math.floor(envNumber('VUS', Math.ceil(N / 500)))));
const RAMP_S = N / RATE; // every VU opens its share at RATE / VUS per second: all finish together
const CLOSE_AT_S = RAMP_S + D; // after its start, each VU closes its sockets at this time
const HOLD_MARGIN_S = envNumber('HOLD_MARGIN_S', 2);
const LATENCY_SAMPLE = Math.min(1, envNumber('LATENCY_SAMPLE', 1));
const LATENCY_EVERY = LATENCY_SAMPLE > 0 ? Math.max(1, Math.round(1 / LATENCY_SAMPLE)) : Infinity;

const CLOSE_CODES = ['none', '1000', '1001', '1002', '1003', '1006', '1008', '1009', '1011', '1012', '1013', '1014'];
const thresholds = {
  ws_connect_failures: [`count<=${envNumber('MAX_CONNECT_FAILURES', 0)}`],
  ws_unexpected_closes: [`count<=${envNumber('MAX_UNEXPECTED_CLOSES', 0)}`],
};
if (__ENV.TICK_P95_MS) thresholds.tick_latency = [`p(95)<${envNumber('TICK_P95_MS', 0)}`];
// Always-true thresholds on the usual close codes, so the summary export counts closes per code.
for (const code of CLOSE_CODES) thresholds[`ws_unexpected_closes{code:${code}}`] = ['count>=0'];

export const options = {
  scenarios: {
    websockets: {
      executor: 'per-vu-iterations',
      vus: VUS,
      iterations: 1,
      maxDuration: `${Math.ceil(CLOSE_AT_S + 60)}s`,
      gracefulStop: '30s',
    },
  },
  thresholds,
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)', 'count'],
};

const connectTime = new Trend('ws_connect_time', true);
const opened = new Counter('ws_sockets_opened');
const connectFailures = new Counter('ws_connect_failures');
const unexpectedCloses = new Counter('ws_unexpected_closes');
const errors = new Counter('ws_errors');
const errorsAfterClose = new Counter('ws_errors_after_close');
const ticksReceived = new Counter('ticks_received');
const ticksMissed = new Counter('ticks_missed');
const tickLatency = new Trend('tick_latency', true);
const tickLatencyHeld = new Trend('tick_latency_held', true);

// When the held phase starts (ms since the epoch): the same instant in every VU of this process,
// from the scenario's start (not the VU's, which may start later).
let heldFrom = Infinity;
// This VU's tick counts since they were last handed to k6 (see flushCounts).
const pending = { received: 0, missed: 0 };

function flushCounts() {
  if (pending.received) ticksReceived.add(pending.received);
  if (pending.missed) ticksMissed.add(pending.missed);
  pending.received = 0;
  pending.missed = 0;
}

const CLOSE_CODE = /close (\d{4})/;


function openSocket(sockets) {
  const measured = sockets.length % LATENCY_EVERY === 0;
  const state = { ws: null, started: Date.now(), open: false, closing: false, done: false, code: '', seq: -1 };
  const ws = new WebSocket(WS_URL);
  state.ws = ws;
  ws.onopen = () => {
    if (state.closing) {
      // It opened only after the hold ended (already counted as a failure): close it now, or
      // the VU's iteration, and so k6, waits for it forever (seen: k6 past its maxDuration).
      ws.close();
      return;
    }
    state.open = true;
    opened.add(1);
    connectTime.add(Date.now() - state.started);
  };
  ws.onmessage = (event) => {
    let tick;
    try {
      tick = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    if (!tick || tick.type !== 'tick' || typeof tick.ts !== 'number') return;
    pending.received += 1;
    if (measured) {
      const received = typeof event.timestamp === 'number' ? event.timestamp : Date.now();
      tickLatency.add(received - tick.ts * 1000);
      if (received >= heldFrom) tickLatencyHeld.add(received - tick.ts * 1000);
    }
    if (typeof tick.seq === 'number') {
      if (state.seq >= 0 && tick.seq > state.seq + 1) pending.missed += tick.seq - state.seq - 1;
      state.seq = tick.seq;
    }
  };
  ws.onerror = (event) => {
    const message = String((event && event.error) || '');
    if (state.closing) {
      errorsAfterClose.add(1);
      return;
    }
    errors.add(1);
    const code = CLOSE_CODE.exec(message);
    if (code) state.code = code[1];
    if (!state.open && !state.done) {
      state.done = true;
      connectFailures.add(1);
    }
  };
  ws.onclose = () => {
    if (state.closing) return;
    if (!state.open) {
      if (!state.done) connectFailures.add(1); // closed before it opened, without an error event
    } else {
      unexpectedCloses.add(1, { code: state.code || 'none' });
    }
    state.done = true;
  };
  sockets.push(state);
}

export default function () {
  heldFrom = exec.scenario.startTime + (RAMP_S + HOLD_MARGIN_S) * 1000;
  const mine = shareOf(N, VUS, __VU);
  holdSockets(mine, RAMP_S, CLOSE_AT_S, openSocket, flushCounts, connectFailures);
}
