# Embedding Trident: the two commands of the quick start, and the checks.
#   make up     install everything, start the stack + a worker + the query API, load samples
#   make down   stop everything (data kept under .stack/)
#   make test   install everything, start the test stack, run lint, types and the whole suite

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install up down status reset test lint typecheck unit bench bench-quick bench-growing bench-reembed \
  bench-scale

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
# own ports) and stops it at the end. TEST_WORKERS pytest processes (pytest-xdist; 0: this one
# alone) share it: the stack tests mostly wait on Kafka, Milvus and Triton, so more processes
# than CI's 2 cores. Each file runs in one process, in the suite's order (its module fixtures
# built once); the tests that stop a service run while no other stack test does, during the
# unit tests (tests/conftest.py). Figures: docs/PERFORMANCE.md, "The test suite's duration".
TEST_WORKERS ?= 3
test: lint typecheck
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# Needs the quick-start stack running (make up); each script prints figures and ratios against
# a baseline measured in the same run, and merges its section into bench/results/latest.json
# (started afresh, so one file never mixes runs); charts.py then draws bench/results/*.png.
# Point at another stack with e.g. BENCH_KAFKA=127.0.0.1:29092 BENCH_TRITON_HTTP=127.0.0.1:28000
# BENCH_TRITON_GRPC=127.0.0.1:28001 BENCH_MILVUS=http://127.0.0.1:29530. bench-quick runs
# every script at small sizes (under ~2 minutes each): it checks the scripts, not the figures.
BENCH_KAFKA       ?= 127.0.0.1:19092
BENCH_TRITON_HTTP ?= 127.0.0.1:18000
BENCH_TRITON_GRPC ?= 127.0.0.1:18001
BENCH_MILVUS      ?= http://127.0.0.1:19530
BENCH_MILVUS_TOKEN_FILE ?= .stack/milvus/secret
BENCH_ONNX        ?= .stack/triton/models/efficientnet_lite0_embedding/1/model.onnx
BENCH_API_KEY     ?=
# The region benchmark (issue 24) reads the stack's Milvus data folder and process ids: its root
# (the quick start's ports; its --port-offset N takes the test stack's ports + N). Full size it
# fills 20,000 images with their regions and waits for Milvus's index builds: ~40 min on 2 cores
# (--quick: ~3 min).
BENCH_STACK_ROOT  ?= .stack
BENCH_ARGS        ?=
BENCH_STACK := --kafka $(BENCH_KAFKA) --triton-grpc $(BENCH_TRITON_GRPC) --milvus $(BENCH_MILVUS) \
  --milvus-token-file $(BENCH_MILVUS_TOKEN_FILE)

# The int8 benchmark's labelled images (Debian's tuxpaint stamps, GPL-2: installed, never
# committed); apt-get as root, through sudo otherwise.
STAMPS := /usr/share/tuxpaint/stamps
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

$(STAMPS):
	$(SUDO) apt-get install -y -q tuxpaint-stamps-default || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q tuxpaint-stamps-default; }

bench: install $(STAMPS)
	rm -f bench/results/latest.json
	$(BIN)/python benchmarks/bench_preprocess.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_int8.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_triton.py --http-url $(BENCH_TRITON_HTTP) \
	  --grpc-url $(BENCH_TRITON_GRPC) $(if $(wildcard $(BENCH_ONNX)),--onnx $(BENCH_ONNX)) $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_milvus.py --uri $(BENCH_MILVUS) $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_search.py $(BENCH_STACK) --api-key '$(BENCH_API_KEY)' $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_e2e.py $(BENCH_STACK) --api-key '$(BENCH_API_KEY)' $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_models.py $(BENCH_STACK) $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_region_search.py --stack-root $(BENCH_STACK_ROOT) $(BENCH_ARGS)
	$(BIN)/python benchmarks/charts.py bench/results/latest.json

bench-quick:
	$(MAKE) bench BENCH_ARGS=--quick

# Issue 25, not part of `make bench` (each takes long on 2 cores): search after a 100k bulk write
# for each variant of Milvus settings (private Milvus servers from the stack's cached binary)
# and while a worker ingests (bench_growing.py, ~40 min); Milvus at scale in stages up to 1M
# vectors (bench_scale.py, hours on 2 cores: pick the stages with BENCH_SCALE_SIZES). Both merge
# their sections into bench/results/latest.json without starting it afresh.
BENCH_GROWING_VARIANTS ?= interim_off stack_builds_not_idle stack
BENCH_SCALE_SIZES ?= 100000 250000 500000 1000000
bench-growing: install
	$(BIN)/python benchmarks/bench_growing.py bulk --variants $(BENCH_GROWING_VARIANTS) \
	  --kafka $(BENCH_KAFKA) --triton-grpc $(BENCH_TRITON_GRPC) $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_growing.py ingest $(BENCH_STACK) $(BENCH_ARGS)

bench-scale: install
	$(BIN)/python benchmarks/bench_scale.py --sizes $(BENCH_SCALE_SIZES) $(BENCH_ARGS)

# Issue 23, not part of `make bench`: a rebuild from Lite0 to Lite2 (trident-reembed) on the quick
# start (its own topic and collections, removed at the end): rebuild rate against the ingest rate
# of the same run, searches before, during and after the switch. ~6 min (--quick: ~3).
bench-reembed: install
	$(BIN)/python benchmarks/bench_reembed.py $(BENCH_ARGS)
