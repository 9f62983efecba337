# Set-up and entry points; each target installs what it needs into $(VENV) first.
PYTHON ?= python3
VENV ?= .venv-ci
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: test demo bench lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# CPU PyTorch first: a plain torch requirement would pull a multi-GB CUDA build.
$(VENV)/.stamp-%: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[torch,$*]"
	touch $@

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q

demo: $(VENV)/.stamp-demo
	$(BIN)/python examples/demo.py

bench: $(VENV)/.stamp-bench
	$(BIN)/python benchmarks/products.py

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check cola_curvature dispatch_rules tests examples benchmarks
	$(BIN)/ruff format --check cola_curvature dispatch_rules tests examples benchmarks
