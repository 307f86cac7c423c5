# The two set-up commands of the README: `make demo` (main job) and `make test` (tests).
# Each creates .venv and installs what it needs on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup demo test lint bench clean

setup:
	@bash .ci/venv.sh $(VENV) test,examples,mlir

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m qbackend demo

test: setup
	$(PY) -m ruff check qbackend tests benchmarks examples
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check qbackend tests benchmarks examples
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) -m qbackend bench --benchmarks benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist *.egg-info
