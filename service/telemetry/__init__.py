"""Telemetry leaves: metrics, the metrics directory, structured logs (they import nothing back)."""
