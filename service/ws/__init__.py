"""WebSockets: protocol guard, prepared frames, pings, and the tick bus."""
