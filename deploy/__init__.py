"""Deployment: the local stack runner (`stack.py`), the images and compose file, Prometheus rules,
the Grafana dashboard generator and the Kubernetes generator (`k8s.py`)."""
