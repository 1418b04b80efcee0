# The two front-door commands. Each one builds its own virtual environment from nothing.
#   make demo   - install what the demo needs (PyTorch CPU, scikit-learn, matplotlib) and run it:
#                 three worked examples from other libraries' docs, then a distillation run on
#                 scikit-learn's digits (figures in demo-output/)
#   make test   - install everything (NumPy, PyTorch CPU, JAX, Keras with TensorFlow, the peers
#                 kldiv is compared against, the docs tools) and run every check and test
# Also:
#   make soak   - the numerically sensitive tests over many seeds (SOAK_SEEDS, default 50)
#   make docs   - serve the documentation site on http://127.0.0.1:8000
#
# PyTorch is pinned to the CPU wheel here so that local work and CI never pull a multi-GB CUDA
# build; pyproject.toml keeps a version range for real users.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
PYTEST_WORKERS ?= 2
SOAK_SEEDS ?= 50

.PHONY: demo test lint typecheck docs-build docs soak bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -qq "$(TORCH_PIN)"
	$(BIN)/python -m pip install -qq -e ".[torch,cli]"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -qq "$(TORCH_PIN)"
	$(BIN)/python -m pip install -qq -e ".[all,test,docs]"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/kldiv demo

lint: $(VENV)/.test-installed
	$(BIN)/python -m ruff check src tests benchmarks examples docs/_ext
	$(BIN)/python -m ruff format --check src tests benchmarks examples docs/_ext

typecheck: $(VENV)/.test-installed
	$(BIN)/python -m mypy

docs-build: $(VENV)/.test-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir $(VENV)/site

test: lint typecheck docs-build
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --durations=25 tests

soak: $(VENV)/.test-installed
	$(BIN)/python tests/soak.py --seeds $(SOAK_SEEDS)

docs: $(VENV)/.test-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs serve

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/bench_core_cpu.py

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .hypothesis .mypy_cache demo-output
