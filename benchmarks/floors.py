"""Measured floors of two missed targets: EKFAC's eigendecompositions, and JAX vs torch GEMVs.

Run ``python -m benchmarks.floors --models mlp cnn transformer`` from the repository root
(one thread for torch; curvlinops installed, as by ``make bench``). It prints

- per model, the median of three EKFAC type-2 builds (ours and curvlinops', on the
  ``Linear``/``Conv2d`` parameters as in the harness) and, inside each, the time spent in
  the eigendecompositions of the Kronecker factors (cProfile: ours in float64 by
  ``symmetric_eigh``, curvlinops' ``torch.linalg.eigh`` in the factors' dtype). Our ``eigh``
  time ÷ curvlinops' build is a floor of "ours ÷ curvlinops" that no other change removes;
- the median time of ``Qᵀ (Q v)`` with a float64 ``n × n`` matrix ``Q`` (the MLP's input
  eigenbasis, ``n = 785``) in torch and in jit-compiled JAX: the kernel ratio under the
  KFAC inverse apply's JAX ÷ torch.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import cola_curvature as cc
from benchmarks.compiled_products import median_seconds
from benchmarks.workloads import kfac_params, torch_problem


def _profiled(thunk: Callable[[], object], function_names: set[str]) -> tuple[float, float]:
    """Return the wall time of ``thunk()`` and the cumulative time in ``function_names``."""
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    thunk()
    profile.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    inside = sum(row[3] for key, row in stats.items() if key[2] in function_names)
    return total, inside


def ekfac_eigh_share(name: str, repeats: int = 3) -> dict[str, float]:
    """Return medians (s) of our and curvlinops' EKFAC builds and of their ``eigh`` time."""
    import curvlinops

    model, X, y = torch_problem(name)
    params, loss_func, data = kfac_params(model), nn.CrossEntropyLoss(), [(X, y)]

    def ours() -> object:
        return cc.EKFAC(model, loss_func, params, data, check_deterministic=False)

    def theirs() -> object:
        operator = curvlinops.EKFACLinearOperator(
            model, loss_func, params, data, fisher_type="type-2", check_deterministic=False
        )
        operator.compute_eigenvalue_correction()
        return operator

    our_runs = [_profiled(ours, {"symmetric_eigh"}) for _ in range(repeats)]
    their_runs = [
        _profiled(theirs, {"<built-in method torch._C._linalg.linalg_eigh>", "eigh"})
        for _ in range(repeats)
    ]
    return {
        "ours": statistics.median(run[0] for run in our_runs),
        "ours_eigh": statistics.median(run[1] for run in our_runs),
        "curvlinops": statistics.median(run[0] for run in their_runs),
        "curvlinops_eigh": statistics.median(run[1] for run in their_runs),
    }


def eigenbasis_matvec(size: int = 785, repeats: int = 200) -> dict[str, float]:
    """Return the median seconds of ``Qᵀ (Q v)`` (float64) in torch and in jit-compiled JAX."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    basis, vector = rng.standard_normal((size, size)), rng.standard_normal(size)
    torch_basis, torch_vector = torch.from_numpy(basis), torch.from_numpy(vector)
    jax_basis, jax_vector = jnp.asarray(basis), jnp.asarray(vector)
    compiled = jax.jit(lambda q, v: q.T @ (q @ v))

    def torch_product() -> object:
        return torch_basis.T @ (torch_basis @ torch_vector)

    def jax_product() -> object:
        return compiled(jax_basis, jax_vector).block_until_ready()

    jax_product()  # compile
    return {
        "torch": median_seconds(torch_product, repeats),
        "jax": median_seconds(jax_product, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | ours EKFAC build | our float64 eigh | curvlinops build | its eigh | floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        t = ekfac_eigh_share(name)
        print(
            f"| {name} | {t['ours'] * 1e3:.0f} ms | {t['ours_eigh'] * 1e3:.0f} ms | "
            f"{t['curvlinops'] * 1e3:.0f} ms | {t['curvlinops_eigh'] * 1e3:.0f} ms | "
            f"{t['ours_eigh'] / t['curvlinops']:.2f} |"
        )
    gemv = eigenbasis_matvec()
    print(
        f"\nQᵀ(Qv), 785 × 785 float64: torch {gemv['torch'] * 1e6:.0f} µs, "
        f"JAX {gemv['jax'] * 1e6:.0f} µs (JAX ÷ torch {gemv['jax'] / gemv['torch']:.2f})"
    )


if __name__ == "__main__":
    main()
