"""Grafana provisioning: dashboards generated as code (`dashboards.py`), datasource and providers."""
