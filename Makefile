# Confide: every target sets up what it needs in .venv, so a fresh clone needs only `make`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# torch first and exactly 2.13.0: the CPU wheel on these machines. Any looser spec
# would pull the newest release with gigabytes of CUDA packages.
TORCH  := torch==2.13.0
BASE_STAMP := $(VENV)/.confide-base
DEV_STAMP  := $(VENV)/.confide-dev
DEMO_OUT   ?= runs/demo

.PHONY: demo test lint protos bench bench-smoke format clean help

help:
	@echo "make demo   - set up .venv and run a real local federation: coordinator + 3 sites over mTLS"
	@echo "make test   - set up .venv with dev extras, lint, type-check and run the whole test suite"
	@echo "make lint   - ruff and mypy"
	@echo "make bench  - the benchmarks in benchmarks/ (long: tens of minutes on 2 cores)"
	@echo "make protos - regenerate the committed stubs in confide/protos from protos/confide/v1"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(BASE_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e .
	@touch $@

$(DEV_STAMP): pyproject.toml $(BASE_STAMP)
	$(PIP) install --quiet -e ".[dev]"
	@touch $@

# A real federation on loopback: PKI and kits, a coordinator and three site processes
# talking mutual TLS, MNIST CNN on a Dirichlet(0.5) split, 3 rounds.
demo: $(BASE_STAMP)
	$(BIN)/confide demo --out $(DEMO_OUT)

test: $(DEV_STAMP) lint
	$(BIN)/python -m pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check confide tests benchmarks examples
	$(BIN)/ruff format --check confide tests benchmarks examples
	$(BIN)/mypy confide

format: $(DEV_STAMP)
	$(BIN)/ruff format confide tests benchmarks examples
	$(BIN)/ruff check --fix confide tests benchmarks examples

# The virtual proto path makes the generated modules import each other as
# confide.protos.v1.*, while the .proto files keep the language-neutral layout.
protos: $(DEV_STAMP)
	$(BIN)/python -m grpc_tools.protoc --proto_path=confide/protos=protos/confide \
		--python_out=. --grpc_python_out=. --pyi_out=. protos/confide/v1/*.proto

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/train_throughput.py --json benchmarks/results/train_throughput.json
	$(BIN)/python benchmarks/fedavg_mnist.py --json benchmarks/results/fedavg_mnist.json
	$(BIN)/python benchmarks/fedavg_shakespeare.py --json benchmarks/results/fedavg_shakespeare.json
	$(BIN)/python benchmarks/dp_accuracy.py --json benchmarks/results/dp_accuracy.json
	$(BIN)/python benchmarks/sim_scale.py --json benchmarks/results/sim_scale.json
	$(BIN)/python benchmarks/accountant.py --json benchmarks/results/accountant.json
	$(BIN)/python benchmarks/load.py --json benchmarks/results/load.json

bench-smoke: $(DEV_STAMP)
	$(BIN)/python benchmarks/train_throughput.py --quick
	$(BIN)/python benchmarks/fedavg_mnist.py --quick
	$(BIN)/python benchmarks/fedavg_shakespeare.py --quick
	$(BIN)/python benchmarks/dp_accuracy.py --quick
	$(BIN)/python benchmarks/sim_scale.py --quick
	$(BIN)/python benchmarks/accountant.py --quick
	$(BIN)/python benchmarks/load.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
