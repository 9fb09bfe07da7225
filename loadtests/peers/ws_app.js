// Node `ws` peer of the shootout (loadtests/shootout.py): the idiomatic ws broadcast on a plain
// node:http server, one process (Node's event loop is single-threaded; no cluster).
//   /ws/ticker      every TICK_INTERVAL s: {"type":"tick","seq":n,"ts":<unix s at fan-out start>,"worker":0}
//   /api/hello      {"message":"hello world"}
//   /api/sleep?ms=N non-blocking wait (setTimeout)
// Environment: HOST (127.0.0.1), PORT (required), TICK_INTERVAL (1.0).
'use strict';
const http = require('node:http');
const { WebSocketServer, WebSocket } = require('ws');

const host = process.env.HOST || '127.0.0.1';
const port = Number(process.env.PORT);
const tickInterval = Number(process.env.TICK_INTERVAL || '1.0');

function json(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) });
  res.end(data);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://peer');
  if (url.pathname === '/api/hello') {
    json(res, 200, { message: 'hello world' });
  } else if (url.pathname === '/api/sleep') {
    const ms = Number(url.searchParams.get('ms') || '0');
    setTimeout(() => json(res, 200, { slept_ms: ms }), ms);
  } else {
    json(res, 404, { error: 'Not Found', status: 404 });
  }
});
server.keepAliveTimeout = 60000;

const wss = new WebSocketServer({ server, path: '/ws/ticker' });
wss.on('connection', (socket) => {
  socket.on('error', () => {});
});

let seq = 0;
setInterval(() => {
  seq += 1;
  const message = JSON.stringify({ type: 'tick', seq, ts: Date.now() / 1000, worker: 0 });
  wss.clients.forEach((client) => {
    if (client.readyState === WebSocket.OPEN) client.send(message);
  });
}, tickInterval * 1000);

server.listen({ host, port, backlog: 2048 }, () => {
  console.log(`ws ${require('ws/package.json').version} listening on ${host}:${port}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
