"""How Redis runs wherever the project runs it (a Kubernetes pod, `make stack`, the tests)."""

# Redis for pub/sub only: no snapshots, no append-only file.
REDIS_FLAGS = ("--save", "", "--appendonly", "no")
