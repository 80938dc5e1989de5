# trio-pubsub: `make run` starts a development broker, `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck unit bench soak mutate system-packages clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

$(VENV)/.installed-mutate: pyproject.toml $(VENV)/.installed-test
	$(BIN)/pip install -q -e '.[test,mutate]'
	touch $@

## run: create .venv if needed, install, start a development broker (prints a token)
run: $(VENV)/.installed-run
	$(BIN)/pubsub-broker dev

system-packages:
	./.ci/install-system-packages

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

## test: install what the tests need (system packages too, when root) and run everything
test: system-packages lint typecheck
	$(BIN)/pytest -q

## bench: the benchmark suite (bounded, writes bench/results/)
bench: $(VENV)/.installed-test system-packages
	$(BIN)/python -m bench.run

## soak: an hour of churn (not part of make test)
soak: $(VENV)/.installed-test
	$(BIN)/python -m bench.soak

## mutate: plant bugs in the core modules, a bounded sample (about 15 minutes, lowest CPU
## priority); writes bench/results/mutate-latest.md (not part of make test)
MUTATE_ARGS ?=
mutate: $(VENV)/.installed-mutate
	rm -rf mutants
	$(BIN)/python -m bench.mutate $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .pubsub-dev mutants
