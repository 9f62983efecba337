# Set-up and entry points; each target installs what it needs into $(VENV) first.
#   make test    the whole suite on 2 workers (what .ci/run runs); serial: make test PYTEST_ARGS=-q
#   make demo    examples/demo.py
#   make bench   benchmarks/harness.py: products, KFAC, curvlinops and JAX vs one gradient
#                (~7 min on an idle 2-core machine; writes benchmarks/RESULTS.md, results/harness.*)
#   make bench-large  benchmarks/large.py: nanoGPT and ResNet-18 at scale vs one gradient (~25 min)
#   make bench-lm     benchmarks/lm.py: optimizers (AdamW, Muon, Shampoo, KFAC, symmetry) on a
#                     character-level GPT (≤ 25 min; fewer steps when the machine is loaded)
#   make bench-symmetry  benchmarks/symmetry_accuracy.py: symmetry curvatures, KFAC, EKFAC,
#                     Shampoo and the diagonal vs exact GGN/Hessian blocks in training (≤ 15 min)
#   make lint    ruff check + ruff format --check
PYTHON ?= python3
VENV ?= .venv-ci
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
# Errors only: one -q still prints a WARNING per package when a configured local index lacks
# it; a failed install still prints its ERROR lines and fails the target.
QUIET := -qq --progress-bar off
TORCH := torch==2.13.0
# CPU torch from PyTorch's own index (PyPI for its dependencies), but only where pip has no
# index configured (pip.conf, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_NO_INDEX): a configured
# mirror may be all the machine can reach, and is then used as it is.
TORCH_INDEX = $(if $(shell $(PIP) config list 2>/dev/null | grep -E '\.(index-url|extra-index-url|no-index)='),,\
	--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
PYTEST_ARGS ?= -n 2 -q
BENCH_ARGS ?=
# Peers the benchmarks and tests/test_laplace_torch.py compare against; --no-deps:
# backpack-for-pytorch and laplace-torch require torchvision, which would replace the pinned
# CPU torch. laplace-torch imports asdl (from asdfghjkl), backpack (needs unfoldNd) and
# torchmetrics (needs lightning-utilities).
PEERS := curvlinops-for-pytorch==3.0.1 backpack-for-pytorch einops einconv opt-einsum linear_operator \
	laplace-torch==0.3 asdfghjkl==0.1a4 unfoldNd torchmetrics lightning-utilities
LINTED := cola_curvature dispatch_rules tests examples benchmarks

.PHONY: test demo bench bench-large bench-lm bench-symmetry lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(QUIET) --upgrade pip

# One stamp per extra, redone when pyproject.toml or this file changes; a re-run with the
# stamp in place installs nothing. CPU torch first: a plain torch requirement would pull a
# multi-GB CUDA build.
$(VENV)/.stamp-%: pyproject.toml Makefile | $(BIN)/python
	$(PIP) install $(QUIET) $(TORCH) $(TORCH_INDEX)
	$(PIP) install $(QUIET) -e ".[torch,$*]"
	touch $@

$(VENV)/.installed-peers: $(VENV)/.stamp-bench
	$(PIP) install $(QUIET) --no-deps $(PEERS)
	touch $@

test: $(VENV)/.stamp-test $(VENV)/.installed-peers
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.stamp-demo
	$(BIN)/python examples/demo.py

bench: $(VENV)/.stamp-bench $(VENV)/.installed-peers
	$(BIN)/python -m benchmarks.harness $(BENCH_ARGS)

bench-large: $(VENV)/.stamp-bench $(VENV)/.installed-peers
	$(BIN)/python -m benchmarks.large

bench-lm: $(VENV)/.stamp-bench
	$(BIN)/python -m benchmarks.lm

bench-symmetry: $(VENV)/.stamp-bench
	$(BIN)/python -m benchmarks.symmetry_accuracy

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
