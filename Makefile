# Embedding Trident: the two commands of the quick start, and the checks.
#   make up     install everything, start the stack + a worker + the query API, load samples
#   make down   stop everything (data kept under .stack/)
#   make test   install everything, start the test stack, run lint, types and the whole suite

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install up down status reset test lint typecheck unit bench

$(VENV)/.installed: pyproject.toml
	@command -v java >/dev/null || { echo "error: a JDK 17+ is needed (java not found)"; exit 1; }
	@command -v mvn >/dev/null || { echo "error: Maven is needed (mvn not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -U pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

up: install
	$(BIN)/trident-stack quickstart

down:
	@if [ -x $(BIN)/trident-stack ]; then $(BIN)/trident-stack down; fi

status: install
	$(BIN)/trident-stack status

reset: install
	$(BIN)/trident-stack reset

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -m "not stack and not faults" $(PYTEST_ARGS)

# The full suite: the session fixture installs and starts the test stack (.stack-test/, its
# own ports) and stops it at the end.
test: lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

# Needs the quick-start stack running (make up); each script prints figures and ratios.
bench: install
	$(BIN)/python benchmarks/bench_preprocess.py
	$(BIN)/python benchmarks/bench_triton.py --http-url 127.0.0.1:18000 --grpc-url 127.0.0.1:18001
	$(BIN)/python benchmarks/bench_milvus.py --uri http://127.0.0.1:19530
