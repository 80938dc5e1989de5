# trio-pubsub: `make run` starts a development broker, `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck unit compile bench soak mutate system-packages clean

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

## compile: build the hot modules (broker/native.py) with mypyc, in place; they are used
## while they match their sources, and `make clean` removes them
compile: $(VENV)/.installed-test
	TRIO_PUBSUB_COMPILE=1 $(BIN)/python setup.py -q build_ext --inplace

# What runs against the compiled modules too: their unit tests (all of tests/unit), the
# fuzzers of frames and commands, and the broker from outside on the paths they serve.
COMPILED_TESTS := tests/unit tests/fuzz/test_fuzz.py tests/integration/test_startup.py \
	tests/integration/test_frame_limits.py tests/integration/test_delivery.py

## test: install what the tests need (system packages too, when root) and run everything:
## the compiled modules' tests compiled (TRIO_PUBSUB_COMPILED=1 refuses pure Python), then
## the whole suite on pure Python
test: system-packages lint typecheck compile
	TRIO_PUBSUB_COMPILED=1 $(BIN)/pytest -q $(COMPILED_TESTS) -k "not atheris"
	TRIO_PUBSUB_COMPILED=0 $(BIN)/pytest -q

## bench: the benchmark suite, on the compiled hot modules when they build (bounded, writes
## bench/results/; the results say which modules ran)
bench: system-packages compile
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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .pubsub-dev mutants build
	rm -f broker/*.so broker/native.json
