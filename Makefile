# The two front-door commands. Each one builds its own virtual environment from nothing.
#   make demo   - set up and run the demo (the seed texts' worked examples, then a distillation
#                 run on scikit-learn's digits; figures in demo-output/)
#   make test   - set up and run every test (NumPy, PyTorch CPU, JAX)
#
# PyTorch is pinned to the CPU wheel here so that local work and CI never pull a multi-GB CUDA
# build; pyproject.toml keeps a version range for real users.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -qq "$(TORCH_PIN)"
	$(BIN)/python -m pip install -qq -e ".[torch,jax,numpy,cli,test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/kldiv demo

test: $(VENV)/.installed
	$(BIN)/python -m ruff check src tests benchmarks
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) tests

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_core_cpu.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
