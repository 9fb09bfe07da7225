// Rooms: N WebSocket members of one room, spread over every worker (and every instance behind
// the URL), and a publisher posting R messages a second for D seconds once all have joined.
//
// Members open /ws/chat?room=ROOM at OPEN_RATE per second (many per VU, one event loop each, as
// websockets.js does); once every member is in (N/OPEN_RATE + WARMUP_S after the start), the
// `publisher` scenario POSTs /api/publish?room=ROOM at R per second for D seconds, each message's
// data a sequence number. Every member measures the delivery latency of each message as
// receive time - its `ts` (the server's clock at the publish: publish to delivery, the backplane
// and the fan-out included) and counts what it got; members close DRAIN_S after the last publish.
//
// Loss is what did not arrive: 1 - room_messages_received / (room_publishes_accepted x N), from the
// summary (tests/test_loadtests_rooms.py computes it; every member is in before the first publish).
//
// Environment (defaults in brackets):
//   BASE_URL   [http://127.0.0.1:8080]  http(s)://host:port; the scheme becomes ws(s)://
//   ROOM       [load.room]              the room
//   N          [1000]                   members
//   OPEN_RATE  [500]                    new members per second (spread evenly over the VUs)
//   R          [10]                     publishes per second
//   D          [20]                     seconds of publishing
//   VUS        [ceil(N / 500)]          VUs the members are spread over (at most N)
//   PUBLISH_VUS [max(2, R / 50)]        VUs the publisher may use (its requests are short)
//   WARMUP_S   [2]                      seconds between the last member's open and the first publish
//   DRAIN_S    [5]                      seconds members stay after the last publish
//   DELIVERY_P95_MS [unset]             threshold on room_delivery p(95), when set
//   LATENCY_SAMPLE  [1]                 share of members whose messages feed room_delivery
//
// Metrics: room_members_opened, room_connect_failures, room_unexpected_closes,
// room_messages_received, room_delivery (Trend, ms), room_publishes_accepted (202),
// room_publishes_refused (any other answer, tagged `status`).
import http from 'k6/http';
import { Counter, Trend } from 'k6/metrics';
import { WebSocket } from 'k6/experimental/websockets';
import { BASE_URL, envNumber, holdSockets, shareOf } from './lib.js';

const ROOM = __ENV.ROOM || 'load.room';
const WS_URL = `${BASE_URL.replace(/^http/, 'ws')}/ws/chat?room=${ROOM}`;
const PUBLISH_URL = `${BASE_URL}/api/publish?room=${ROOM}`;
const N = Math.max(1, Math.floor(envNumber('N', 1000)));
const OPEN_RATE = Math.max(0.001, envNumber('OPEN_RATE', 500));
const R = Math.max(0.001, envNumber('R', 10));
const D = Math.max(1, envNumber('D', 20));
const VUS = Math.min(N, Math.max(1, Math.floor(envNumber('VUS', Math.ceil(N / 500)))));
const PUBLISH_VUS = Math.max(1, Math.floor(envNumber('PUBLISH_VUS', Math.max(2, Math.ceil(R / 50)))));
const WARMUP_S = envNumber('WARMUP_S', 2);
const DRAIN_S = envNumber('DRAIN_S', 5);
const RAMP_S = N / OPEN_RATE;
const PUBLISH_AT_S = Math.ceil(RAMP_S + WARMUP_S);
const CLOSE_AT_S = PUBLISH_AT_S + D + DRAIN_S; // after the scenario's start
const LATENCY_SAMPLE = Math.min(1, envNumber('LATENCY_SAMPLE', 1));
const LATENCY_EVERY = LATENCY_SAMPLE > 0 ? Math.max(1, Math.round(1 / LATENCY_SAMPLE)) : Infinity;

const thresholds = {
  room_connect_failures: ['count<=0'],
  room_unexpected_closes: ['count<=0'],
  room_publishes_refused: ['count<=0'],
};
if (__ENV.DELIVERY_P95_MS) thresholds.room_delivery = [`p(95)<${envNumber('DELIVERY_P95_MS', 0)}`];

export const options = {
  scenarios: {
    members: {
      executor: 'per-vu-iterations',
      exec: 'members',
      vus: VUS,
      iterations: 1,
      maxDuration: `${Math.ceil(CLOSE_AT_S + 60)}s`,
      gracefulStop: '30s',
    },
    publisher: {
      executor: 'constant-arrival-rate',
      exec: 'publish',
      rate: Math.max(1, Math.round(R * 100)),
      timeUnit: '100s', // R may be fractional
      duration: `${D}s`,
      startTime: `${PUBLISH_AT_S}s`,
      preAllocatedVUs: PUBLISH_VUS,
      maxVUs: PUBLISH_VUS * 4,
    },
  },
  thresholds,
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)', 'count'],
};

const opened = new Counter('room_members_opened');
const connectFailures = new Counter('room_connect_failures');
const unexpectedCloses = new Counter('room_unexpected_closes');
const received = new Counter('room_messages_received');
const delivery = new Trend('room_delivery', true);
const accepted = new Counter('room_publishes_accepted');
const refused = new Counter('room_publishes_refused');

// What every room message starts with (service/rooms/members.py: orjson keeps the keys in this order).
const MESSAGE_PREFIX = '{"type":"message",';
let pendingReceived = 0; // handed to k6 once a second, not per message (as websockets.js does)


function openMember(sockets) {
  const measured = sockets.length % LATENCY_EVERY === 0;
  const state = { ws: null, open: false, closing: false, done: false };
  const ws = new WebSocket(WS_URL);
  state.ws = ws;
  ws.onopen = () => {
    if (state.closing) {
      ws.close();
      return;
    }
    state.open = true;
    opened.add(1);
  };
  ws.onmessage = (event) => {
    if (!measured) {  // counted without a JSON.parse: less of k6's CPU per message
      if (typeof event.data === 'string' && event.data.startsWith(MESSAGE_PREFIX)) pendingReceived += 1;
      return;
    }
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    if (!message || message.type !== 'message' || typeof message.ts !== 'number') return;
    pendingReceived += 1;
    const at = typeof event.timestamp === 'number' ? event.timestamp : Date.now();
    delivery.add(at - message.ts * 1000);
  };
  ws.onerror = () => {
    if (!state.closing && !state.open && !state.done) {
      state.done = true;
      connectFailures.add(1);
    }
  };
  ws.onclose = () => {
    if (state.closing) return;
    if (state.open) unexpectedCloses.add(1);
    else if (!state.done) connectFailures.add(1);
    state.done = true;
  };
  sockets.push(state);
}

function flush() {
  if (pendingReceived) received.add(pendingReceived);
  pendingReceived = 0;
}

export function members() {
  const mine = shareOf(N, VUS, __VU);
  holdSockets(mine, RAMP_S, CLOSE_AT_S, openMember, flush, connectFailures);
}

export function publish() {
  const response = http.post(PUBLISH_URL, JSON.stringify({ data: `m${__ITER}-${__VU}` }), {
    headers: { 'Content-Type': 'application/json' },
    tags: { name: 'publish' },
  });
  if (response.status === 202) accepted.add(1);
  else refused.add(1, { status: String(response.status) });
}
