# Set-up and entry points; each target installs what it needs into $(VENV) first.
#   make test    the whole suite on 2 workers (what .ci/run runs); serial: make test PYTEST_ARGS=-q
#   make demo    examples/demo.py
#   make bench   benchmarks/harness.py: products, KFAC, curvlinops and JAX vs one gradient
#                (~7 min on an idle 2-core machine; writes benchmarks/RESULTS.md, results/harness.*)
#   make bench-large  benchmarks/large.py: nanoGPT and ResNet-18 at scale vs one gradient (~25 min)
#   make lint    ruff check + ruff format --check
PYTHON ?= python3
VENV ?= .venv-ci
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
TORCH := torch==2.13.0
PYTEST_ARGS ?= -n 2 -q
BENCH_ARGS ?=
# Peers the benchmarks and tests/test_laplace_torch.py compare against; --no-deps:
# backpack-for-pytorch and laplace-torch require torchvision, which would replace the pinned
# CPU torch. laplace-torch imports asdl (from asdfghjkl), backpack (needs unfoldNd) and
# torchmetrics (needs lightning-utilities).
PEERS := curvlinops-for-pytorch==3.0.1 backpack-for-pytorch einops einconv opt-einsum linear_operator \
	laplace-torch==0.3 asdfghjkl==0.1a4 unfoldNd torchmetrics lightning-utilities
LINTED := cola_curvature dispatch_rules tests examples benchmarks

.PHONY: test demo bench bench-large lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# One stamp per extra, redone when pyproject.toml or this file changes; a re-run with the
# stamp in place installs nothing. CPU torch first: a plain torch requirement would pull a
# multi-GB CUDA build.
$(VENV)/.stamp-%: pyproject.toml Makefile | $(BIN)/python
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[torch,$*]"
	touch $@

$(VENV)/.installed-peers: $(VENV)/.stamp-bench
	$(PIP) install --quiet --no-deps $(PEERS)
	touch $@

test: $(VENV)/.stamp-test $(VENV)/.installed-peers
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.stamp-demo
	$(BIN)/python examples/demo.py

bench: $(VENV)/.stamp-bench $(VENV)/.installed-peers
	$(BIN)/python -m benchmarks.harness $(BENCH_ARGS)

bench-large: $(VENV)/.stamp-bench $(VENV)/.installed-peers
	$(BIN)/python -m benchmarks.large

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
