# The two commands a fresh machine needs: `make run` and `make test`. Both install what is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODELS ?= models
# `make run PORT=9000 HOST=0.0.0.0 ARGS="--token s3cret --device cuda:0"`; empty: the settings' defaults.
PORT   ?=
HOST   ?=
ARGS   ?=
SERVE_ARGS = --models $(MODELS) $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT)) $(ARGS)
CHROMIUM := /usr/lib/chromium/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install run test test-random check lint types fmt demo clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(MODELS):
	$(PY) -m modelkeeper demo-models $(MODELS)

demo: $(STAMP) $(MODELS)

run: $(STAMP) $(MODELS)
	$(PY) -m modelkeeper serve $(SERVE_ARGS)

# Debian's Chromium, driven by Playwright in the dashboard's browser tests (tests/web).
$(CHROMIUM):
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The suite in a shuffled order (pytest-randomly; its seed printed: SEED=N replays one order).
test-random: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -n 2 --dist loadgroup -p randomly $(if $(SEED),--randomly-seed=$(SEED)) $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	PYTHONPATH=src $(VENV)/bin/lint-imports --no-logo

types: $(STAMP)
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

check: lint types test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
