# Set-up and entry points. Every target installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Keep Ray on loopback, and quiet; the proxy replays requests lost with a Router replica
# (serve_app/api/failover.py).
RAY_ENV := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 \
	RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.api.failover.proxy_middlewares
CONFIG ?= configs/cpu.yaml

.PHONY: install serve test test-fast test-tools lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel; a plain `torch` requirement pulls a CUDA build.
	$(BIN)/pip install -q "torch==2.13.*"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

# Serve the offline CPU config on http://127.0.0.1:8000 (Ctrl-C stops it).
serve: install
	$(RAY_ENV) $(BIN)/serve run $(CONFIG)

# espeak-ng gives the tests real speech; without it they use tones and noise only.
test-tools:
	@command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) \
		|| echo "espeak-ng could not be installed: speech clips will be skipped"
	@# Debian's chromium, driven by playwright (no browser download) for the web page tests.
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser tests will be skipped"

# ruff (pinned in the test extra, configured in pyproject.toml): before any test runs.
lint: install
	$(BIN)/ruff check .

# Two pytest processes: the suite on its one-node cluster, then tests/multinode on a cluster
# of several nodes (one driver joins one cluster). Exit status 5: PYTEST_ARGS selected none there.
test: install test-tools lint
	$(RAY_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS)
	$(RAY_ENV) $(BIN)/python -m pytest tests/multinode $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The quick tier: ruff and the tests that start no Ray cluster.
test-fast: install test-tools lint
	$(RAY_ENV) $(BIN)/python -m pytest -m "not cluster" $(PYTEST_ARGS)
