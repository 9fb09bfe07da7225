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
