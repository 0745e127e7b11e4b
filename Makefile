# Set-up and entry points. Every target installs what it needs on a fresh machine.
# python3.11 where there is one (the package needs 3.11), else python3; `make PYTHON=...` to choose.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV := .venv
BIN := $(VENV)/bin
# Keep Ray on loopback, and quiet; the proxy replays requests lost with a Router replica
# (serve_app/api/failover.py).
RAY_ENV := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 \
	RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.api.failover.proxy_middlewares
CONFIG ?= configs/cpu.yaml
# The locks, written by `make lock` from pyproject.toml: every package's version and hashes, for
# CPython 3.11 on Linux x86_64 (glibc 2.28 or later, as torch's wheels). LOCK: this environment
# (the package's dependencies, its test and notebook extras, torch's CPU build); IMAGE_LOCK: the
# Dockerfile's (the dependencies, with PyPI's CUDA build of torch).
LOCK := requirements/cpu.txt
IMAGE_LOCK := requirements/image.txt
# torch's CPU build is not on PyPI (PyPI's Linux x86_64 torch is the CUDA one): pip takes it
# from wherever it is configured to look (find-links, an index), else from PyTorch's CPU index.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# The resolver, pinned (another release may resolve or write the locks differently), in its own
# venv: the project's holds the lock and nothing else.
UV_VERSION := 0.13.9
UV_VENV := build/uv
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	--override requirements/torch.txt --custom-compile-command "make lock"
# e.g. LOCK_ARGS=--upgrade: every package to its newest allowed release (by default a version
# already locked stays while pyproject.toml allows it).
LOCK_ARGS ?=

.PHONY: install serve test test-fast test-tools lint lock

# The lock, hashes required (a file that differs from the locked one is refused), by the venv's
# own pip: every version is given, nothing is resolved. Then this package, editable, with no
# dependencies and the locked setuptools (no build environment to resolve).
$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r $(LOCK) \
		|| { echo "retrying with $(TORCH_CPU_INDEX) (torch's CPU build is not on PyPI)"; \
		     $(BIN)/pip install -q --require-hashes -r $(LOCK) --extra-index-url $(TORCH_CPU_INDEX); }
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

# Both locks, from pyproject.toml and requirements/torch.txt (the one torch release both pin).
# The CPU lock's torch is the CPU wheel that pip finds as `make install` does (build/torch-cpu):
# its hash is that file's.
lock:
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/pip install -q "uv==$(UV_VERSION)"
	rm -rf build/torch-cpu
	torch="$$(grep '^torch==' requirements/torch.txt)+cpu"; \
		$(UV_VENV)/bin/pip download -q --no-deps -d build/torch-cpu "$$torch" \
		|| $(UV_VENV)/bin/pip download -q --no-deps -d build/torch-cpu "$$torch" \
			--extra-index-url $(TORCH_CPU_INDEX)
	$(UV_VENV)/bin/uv pip compile -q pyproject.toml --extra test --extra notebook $(LOCK_FLAGS) \
		--find-links build/torch-cpu $(LOCK_ARGS) -o $(LOCK)
	$(UV_VENV)/bin/uv pip compile -q pyproject.toml $(LOCK_FLAGS) $(LOCK_ARGS) -o $(IMAGE_LOCK)

# Serve the offline CPU config on http://127.0.0.1:8000 (Ctrl-C stops it).
serve: install
	$(RAY_ENV) $(BIN)/serve run $(CONFIG)

# The suite's system programs, from the machine's Debian packages (apt-get, as root), each only
# where its command is missing:
#   espeak-ng  speaks the speech in the test clips (tests/clips.py, tests/conversation.py);
#              without it the clips are tones and noise and the speech tests are skipped;
#   chromium   the browser playwright (locked) drives for the web page tests, so that playwright
#              downloads none; without it those tests are skipped.
# No versions pinned: a Debian release's archive keeps only the current build of a package
# (point releases and security updates replace it, chromium's every few weeks), so
# `apt-get install PKG=VERSION` fails once that build is superseded. The release fixes what may
# change; the versions installed are printed.
TEST_TOOLS := espeak-ng chromium

test-tools:
	@updated=; for tool in $(TEST_TOOLS); do \
		command -v $$tool >/dev/null && continue; \
		echo "test-tools: installing Debian's $$tool (apt-get)"; \
		{ [ -n "$$updated" ] || apt-get update -qq; } && updated=1 \
			&& apt-get install -y -qq $$tool >/dev/null \
			|| echo "test-tools: $$tool could not be installed: the tests that need it are skipped"; \
	done; dpkg-query -W -f 'test-tools: $${Package} $${Version}\n' $(TEST_TOOLS) 2>/dev/null || true

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
