# `make train`: set up and train on the shipped data; `make test`: set up and run the whole test suite (CI);
# `make test-fast`: the unit tests only (no tests marked slow: training processes, torchrun, ONNX exports, SLURM).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train test test-fast

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement could pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0

$(VENV)/.installed: $(BIN)/activate setup.cfg pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(BIN)/python train.py --config configs/womens_clothing.yaml $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests $(ARGS)
