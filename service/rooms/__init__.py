"""Rooms: members per worker, the hub that joins them to the backplane, the backplanes, rate limits,
and their metrics."""
