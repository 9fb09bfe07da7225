"""Deployment: the local stack runner (and, later, container and Prometheus files)."""
