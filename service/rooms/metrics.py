"""The metrics of rooms and their backplane (service.rooms.hub writes them, nothing else does).

Kept apart from service.telemetry.metrics, with the same rules: multiprocess values summed at scrape time,
every metric labelled (so importing this creates no file), imported only once the metrics
directory is prepared. Labels are bounded: `room_class` is one of ROOM_CLASSES or `other`
(never a room name: clients make those up), `backplane` is `embedded` or `redis`, `reason` one
of the few listed with each metric, `worker` a worker id.

This module is a leaf: everything may import it and it imports nothing from the service.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BACKPLANE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

PUBLISHED = Counter(
    "tornado_room_messages_published_total",
    "Messages published to rooms (counted once, by the worker that took the publish)", ["room_class"],
)
DELIVERED = Counter(
    "tornado_room_messages_delivered_total",
    "Room messages handed to members (one per WebSocket or long poll reached)", ["room_class"],
)
REJECTED = Counter(
    "tornado_room_publishes_rejected_total",
    "Publishes refused: reason backplane_down (503), backplane_full (503), rate_limited (429 or "
    "close 4029), too_large (413; a WebSocket message is closed with 1009 by Tornado before this)",
    ["room_class", "reason"],
)
SLOW_SUBSCRIBERS = Counter(
    "tornado_room_slow_subscribers_dropped_total",
    "Room WebSockets disconnected because their reader fell MAX_WRITE_BUFFER bytes behind", ["room_class"],
)
BACKPLANE_LATENCY = Histogram(
    "tornado_backplane_latency_seconds",
    "From a message's publish (its ts, the publisher's clock) to the end of its fan-out in a worker "
    "that got it over the backplane", ["backplane"], buckets=BACKPLANE_BUCKETS,
)
BACKPLANE_UP = Gauge(
    "tornado_backplane_up", "1 while the worker's backplane takes publishes, 0 while it is down",
    ["worker", "backplane"], multiprocess_mode="livemax",
)
BACKPLANE_DROPPED = Counter(
    "tornado_backplane_dropped_total",
    "Records a worker's backplane could not carry: peer_down, queue_full, too_large (embedded), "
    "disconnected (Redis), shutdown", ["backplane", "reason"],
)
ROOMS = Gauge(
    "tornado_rooms_active", "Rooms with at least one member in the worker (sampled every second)",
    ["worker"], multiprocess_mode="livesum",
)
MEMBERS = Gauge(
    "tornado_room_members", "Room members in the worker: WebSockets and waiting long polls (sampled)",
    ["worker"], multiprocess_mode="livesum",
)
