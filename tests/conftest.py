"""Fixtures generated from the case matrix in ``tests/cases.py``."""

import os

import pytest
import torch

from tests.cases import CASES

# Every test problem is tiny: intra-op threads only add overhead, and with pytest-xdist
# workers they oversubscribe the cores (the reference suite ran 7x slower on 2 cores).
torch.set_num_threads(1)
# The JAX tests compile hundreds of tiny programs, each run a few times: XLA's backend
# optimisation costs more than it saves (20-40% of those files' CPU time). Read when jax is
# first imported (nothing above imports it); subprocesses inherit it. Same values, to rounding.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Compiling is most of the JAX tests' time (about 0.1 s for each of ~120 programs in one
# per-example diagonal test), and XLA:CPU's fusion emitters take about twice as long to
# compile as its older loop emitters, which compute the same operations: the JAX files ran
# in 322 CPU-seconds instead of 600. Appended, so that a caller's flags (a device count) stay.
CPU_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
if CPU_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_COMPILE_FLAG}".strip()


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def case(request):
    """One ``Case`` of the matrix, with a readable id such as ``mlp-ce-mean-uneven``."""
    return request.param


@pytest.fixture
def problem(case):
    """``(model, loss_func, params, data)`` built from the case."""
    return case.build()


@pytest.fixture
def options(case):
    """Keyword arguments the operators need for the case (e.g. ``batch_size_fn``)."""
    return case.options


@pytest.fixture(scope="module")
def jax_float64():
    """Run a module's tests with ``jax_enable_x64`` and restore the setting after.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("jax_float64")``.
    """
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
