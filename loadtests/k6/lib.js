// What every scenario reads from the environment the same way (imported by each script).

// A non-negative number from the environment, or `fallback` when unset or empty; anything else
// stops the run at once with the variable's name.
export function envNumber(name, fallback) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < 0) throw new Error(`${name} must be a non-negative number, got ${raw}`);
  return value;
}

// The deployment under load: BASE_URL without a trailing slash (the local stack's Nginx by default).
export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');

// This VU's part of `total` clients spread over `vus` VUs, as evenly as they allow.
export function shareOf(total, vus, vu) {
  const base = Math.floor(total / vus);
  return base + ((vu - 1) % vus < total % vus ? 1 : 0);
}

// One VU's sockets: `open(sockets)` pushes one socket state ({ ws, open, closing, done }) onto
// `sockets`, and is called at an even pace so that `mine` are started over `rampS` seconds.
// `flush` hands the VU's batched counts to k6 once a second and at the end. At `closeAtS` seconds
// every socket still open is closed by this client (`closing`, so its close is not a failure),
// and every one not open by then, or never even started (the VU's timers fell that far
// behind), is added to `connectFailures`.
export function holdSockets(mine, rampS, closeAtS, open, flush, connectFailures) {
  const perSecond = mine / rampS;
  const sockets = [];
  const start = Date.now();
  const opener = setInterval(() => {
    const due = Math.min(mine, Math.floor(((Date.now() - start) / 1000) * perSecond) + 1);
    while (sockets.length < due) open(sockets);
    if (sockets.length >= mine) clearInterval(opener);
  }, Math.max(10, Math.min(100, 1000 / perSecond)));
  const flusher = setInterval(flush, 1000);
  setTimeout(() => {
    clearInterval(opener);
    clearInterval(flusher);
    flush();
    for (const state of sockets) {
      if (state.done) continue;
      if (!state.open) connectFailures.add(1);
      state.closing = true;
      state.done = true;
      state.ws.close();
    }
    if (sockets.length < mine) connectFailures.add(mine - sockets.length);
  }, closeAtS * 1000);
}
