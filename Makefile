# p11guard — `make run` and `make test` do all set-up on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.stamp-installed
TEST_STAMP := $(VENV)/.stamp-test

.PHONY: build run test lint typecheck unit integration bench bench-quick bench-deps clean client-lib system system-test

build: system $(STAMP) client-lib

system:
	@tools/setup-system.sh run

system-test:
	@tools/setup-system.sh test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	@touch $@

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(PIP) install -q -e '.[test]'
	@touch $@

client-lib:
	$(MAKE) -s -C native/client all
	$(MAKE) -s -C native/server all

run: build
	$(VENV)/bin/p11guard demo

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests tools bench

typecheck: $(TEST_STAMP)
	$(VENV)/bin/mypy

test: build system-test $(TEST_STAMP)
	$(MAKE) -s -C native/client asan check-procs
	$(MAKE) -s -C tests/native
	$(MAKE) -s lint
	$(MAKE) -s typecheck
	tools/run-pytest.sh

unit: $(TEST_STAMP)
	tools/run-pytest.sh tests/unit

# The benchmark suite (docs/benchmarks.md): about 15 minutes; bench-quick 2-3 minutes.
# matplotlib (the chart) is installed when missing; without it the report has no chart.
bench: build system-test $(TEST_STAMP) bench-deps
	$(MAKE) -s -C bench
	$(PY) bench/run.py

bench-quick: build system-test $(TEST_STAMP) bench-deps
	$(MAKE) -s -C bench
	$(PY) bench/run.py --quick

bench-deps: | $(VENV)/bin/python
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PIP) install -q -e '.[bench]' || \
	    echo "bench: matplotlib not installed, the report will have no chart" >&2

clean:
	rm -rf $(VENV) native/client/build native/server/build bench/build .mypy_cache .ruff_cache .pytest_cache
