# shoal: `make run` trains the default preset locally, `make test` runs the test suite.
# Both create .venv and install what they need (torch first, pinned to the CPU wheel range).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS ?=

.PHONY: run test test-fast lint bench setup redis browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed redis browser

# Tests and local runs start their own private redis-server; this only makes sure the binary exists.
redis:
	@command -v redis-server >/dev/null || ( $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server )

# CI also installs headless Chromium so the dashboard browser test runs there (it skips without one).
browser:
	@[ "$$CI" != true ] || command -v chromium >/dev/null || ( $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium )

run: setup
	$(VENV)/bin/shoal run spread-gnn $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

# Quick feedback: no Ray, Redis, torch.distributed, S3 server or slow end-to-end tests.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow and not ray and not redis and not distributed and not storage" $(ARGS)

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m benchmarks.spread

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
