"""HTTP serving: the capped server, forwarded headers, the per-worker context and state, ids, access lines."""
