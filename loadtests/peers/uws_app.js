// uWebSockets.js peer of the shootout (loadtests/shootout.py): the idiomatic uWS broadcast, every
// socket subscribed to one topic and each tick one app.publish(). One process.
//   /ws/ticker      every TICK_INTERVAL s: {"type":"tick","seq":n,"ts":<unix s at fan-out start>,"worker":0}
//   /api/hello      {"message":"hello world"}
//   /api/sleep?ms=N non-blocking wait (setTimeout)
// Environment: HOST (127.0.0.1), PORT (required), TICK_INTERVAL (1.0).
//
// The official uWebSockets.js is installed from GitHub, which these machines cannot reach. The npm
// package @trufflesuite/uws-js-unofficial carries uWS.js v20.30.0's prebuilt binaries; its entry
// point silently falls back to a pure-JS imitation when no binary fits, so the native binary is
// loaded here directly: no binary, no contestant (it exits with the reason).
'use strict';
const path = require('node:path');

const binary = path.join(
  path.dirname(require.resolve('@trufflesuite/uws-js-unofficial/package.json')),
  'binaries', `uws_${process.platform}_${process.arch}_${process.versions.modules}.node`,
);
let uWS;
try {
  uWS = require(binary);
} catch (error) {
  console.error(`uWebSockets.js native binary unusable here: ${error.message}`);
  process.exit(3);
}

const host = process.env.HOST || '127.0.0.1';
const port = Number(process.env.PORT);
const tickInterval = Number(process.env.TICK_INTERVAL || '1.0');
const TOPIC = 'ticker';

function json(res, status, body) {
  res.cork(() => {
    res.writeStatus(status).writeHeader('Content-Type', 'application/json').end(JSON.stringify(body));
  });
}

const app = uWS.App()
  .ws('/ws/ticker', {
    compression: uWS.DISABLED,
    maxPayloadLength: 64 * 1024,
    idleTimeout: 120,
    open: (ws) => { ws.subscribe(TOPIC); },
  })
  .get('/api/hello', (res) => json(res, '200 OK', { message: 'hello world' }))
  .get('/api/sleep', (res, req) => {
    const ms = Number(req.getQuery('ms') || '0');
    let aborted = false;
    res.onAborted(() => { aborted = true; });
    setTimeout(() => { if (!aborted) json(res, '200 OK', { slept_ms: ms }); }, ms);
  })
  .any('/*', (res) => json(res, '404 Not Found', { error: 'Not Found', status: 404 }));

let seq = 0;
setInterval(() => {
  seq += 1;
  app.publish(TOPIC, JSON.stringify({ type: 'tick', seq, ts: Date.now() / 1000, worker: 0 }), false);
}, tickInterval * 1000);

app.listen(host, port, (token) => {
  if (!token) {
    console.error(`uWebSockets.js could not listen on ${host}:${port}`);
    process.exit(1);
  }
  console.log(`uWebSockets.js (native ${path.basename(binary)}) listening on ${host}:${port}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
