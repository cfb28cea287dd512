# `make train`: set up and train on the shipped data; `make test`: set up and run the test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train test

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
