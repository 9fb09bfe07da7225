# Two commands do all set-up on a fresh Debian machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

# Debian packages: what `make stack` runs, and what the tests talk to (they run the real things).
STACK_DEBS := nginx prometheus prometheus-nginx-exporter openssl
TEST_DEBS := util-linux nginx prometheus openssl curl

.PHONY: run test stack bench lint clean

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

## run: the service on its built-in defaults (port 8888, one worker per usable CPU); ARGS="--port 9000"
run: $(VENV)/.runtime
	$(BIN)/python -m service $(ARGS)

## test: lint, type-check, then the whole test suite against real processes
test: $(VENV)/.test
	@scripts/install-debian.sh $(TEST_DEBS)
	$(BIN)/ruff check service tests bench nginx deploy
	$(BIN)/mypy
	$(BIN)/python -m pytest $(ARGS)

## bench: instrumentation cost, bare Tornado vs this service side by side (bench/results/)
bench: $(VENV)/.test
	@scripts/install-debian.sh wrk
	$(BIN)/python bench/instrumentation.py $(ARGS)

## stack: the service, Nginx (HTTP and TLS/HTTP2) and Prometheus as local processes; ARGS="--http-port 9080"
stack: $(VENV)/.runtime
	@scripts/install-debian.sh $(STACK_DEBS)
	$(BIN)/python -m deploy.stack $(ARGS)

lint: $(VENV)/.test
	$(BIN)/ruff check service tests bench nginx deploy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
