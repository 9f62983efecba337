"""Randomized estimators of traces, diagonals, norms, log-determinants and spectral densities.

All work on any square, symmetric CoLA operator (torch or JAX) through ``A @ V`` with many
columns, so a curvature operator shares one forward pass across a whole block of test
vectors. Each takes a budget of matrix-vector products and a seed; the global RNG state
is left alone. The functions of one algorithm call that algorithm's object (the
implementations live in :mod:`cola_curvature.matfree`, one file per method, and the rules
in :mod:`dispatch_rules` call the same objects); the spectral densities, for plotting,
are computed here from its Lanczos quadrature.

Sources: Hutchinson (1989); Hutch++ (Meyer, Musco, Musco & Woodruff 2021); XTrace and
XDiag (Epperly, Tropp & Webber 2024); stochastic Lanczos quadrature (Ubaru, Chen & Saad
2017); spectral densities (Papyan 2020; Ghorbani, Krishnan & Xiao 2019). Written on
CoLA's backend functions rather than calling the ``matfree`` library, so one code path
serves both frameworks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cola.ops import LinearOperator

from cola_curvature._tracing import is_traced
from cola_curvature.matfree import SLQ, Hutchinson, HutchPlusPlus, XTrace
from cola_curvature.matfree._arguments import check_positive, check_square
from cola_curvature.matfree._random import gaussian
from cola_curvature.matfree.krylov import gauss_quadrature
from cola_curvature.matfree.slq import SpectralQuadrature
from cola_curvature.types import Array


def hutchinson_trace(A: LinearOperator, alg: Hutchinson | None = None) -> Array:
    """Return ``(1/m) Σ_j z_jᵀ A z_j`` with Rademacher ``z_j``: :meth:`Hutchinson.trace`."""
    return (alg or Hutchinson()).trace(A)


def hutchinson_diagonal(A: LinearOperator, alg: Hutchinson | None = None) -> Array:
    """Return ``(1/m) Σ_j z_j ⊙ A z_j`` with Rademacher ``z_j``: :meth:`Hutchinson.diagonal`."""
    return (alg or Hutchinson()).diagonal(A)


def frobenius_norm_squared(A: LinearOperator, alg: Hutchinson | None = None) -> Array:
    """Return ``(1/m) Σ_j ‖A z_j‖²``, unbiased for ``‖A‖_F² = tr(AᵀA)`` (``m`` products).

    :meth:`Hutchinson.frobenius_norm_squared`.
    """
    return (alg or Hutchinson()).frobenius_norm_squared(A)


def hutchpp_trace(A: LinearOperator, alg: HutchPlusPlus | None = None) -> Array:
    """Return the Hutch++ estimate ``tr(QᵀAQ) + (1/g) Σ_j g̃_jᵀ A g̃_j``: ``HutchPlusPlus.trace``."""
    return (alg or HutchPlusPlus()).trace(A)


def xtrace(A: LinearOperator, alg: XTrace | None = None) -> Array:
    """Return the XTrace estimate of ``tr A``: :meth:`XTrace.trace`."""
    return (alg or XTrace()).trace(A)


def xdiag(A: LinearOperator, alg: XTrace | None = None) -> Array:
    """Return the XDiag estimate of ``diag A``: :meth:`XTrace.diagonal`."""
    return (alg or XTrace()).diagonal(A)


def stochastic_lanczos_quadrature(
    A: LinearOperator, f: Callable[[Array], Array], alg: SLQ | None = None
) -> Array:
    """Return ``tr f(A) ≈ (D/p) Σ_probes Σ_i τ_i² f(θ_i)``: :meth:`SLQ.trace_function`."""
    return (alg or SLQ()).trace_function(A, f)


def slq_slogdet(A: LinearOperator, alg: SLQ | None = None) -> tuple[Array, Array]:
    """Return ``(sign, log|det A|)`` with ``log|det A| = tr log|A|`` by SLQ: :meth:`SLQ.slogdet`."""
    return (alg or SLQ()).slogdet(A)


@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed spectral density ``φ(t) = (1/r) Σ_runs Σ_i τ_i² N(t; θ_i, σ²)`` on a grid.

    Attributes:
        grid: Evaluation points ``t`` (eigenvalues, or ``log10|λ|`` when ``log_scale``).
        density: ``φ(t)``; integrates to 1 over ``grid`` when it covers the nodes.
        nodes: Ritz values ``θ`` ``(runs, steps)``, in the units of ``grid``.
        weights: Quadrature weights ``τ²`` ``(runs, steps)``, each row summing to 1.
        sigma: The Gaussian width ``σ``.
        log_scale: Whether ``grid`` and ``nodes`` are ``log10|λ|``.

    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    log_scale: bool


def _quadrature_nodes(
    A: LinearOperator, num_runs: int, num_steps: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return Lanczos nodes and weights of ``num_runs`` Gaussian probes, as NumPy arrays."""
    check_square(A)
    check_positive("num_runs", num_runs)
    check_positive("num_steps", num_steps)
    nodes, weights = gauss_quadrature(A, gaussian(A, num_runs, seed), num_steps)
    if is_traced(nodes):
        raise ValueError(
            "spectral_density and log_spectral_density return NumPy arrays for plotting and "
            "need values; call them outside jax.jit (inside, "
            "estimators.SpectralQuadrature.of(A, cc.SLQ(...)) gives traced nodes and weights)."
        )
    return A.xnp.to_np(nodes).astype(np.float64), A.xnp.to_np(weights).astype(np.float64)


def _smoothed_density(
    nodes: np.ndarray,
    weights: np.ndarray,
    sigma: float | None,
    num_points: int,
    grid: np.ndarray | None,
    log_scale: bool,
) -> SpectralDensity:
    """Return the Gaussian-smoothed mixture of the nodes on ``grid`` (linear, ±5σ by default)."""
    low, high = float(nodes.min()), float(nodes.max())
    width = high - low if high > low else max(abs(high), 1.0)
    sigma = width / 100 if sigma is None else sigma
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}.")
    if grid is None:
        grid = np.linspace(low - 5 * sigma, high + 5 * sigma, num_points)
    grid = np.asarray(grid, dtype=np.float64)
    offsets = (grid[:, None, None] - nodes[None]) / sigma
    kernels = np.exp(-0.5 * offsets**2) / (sigma * math.sqrt(2 * math.pi))
    density = (kernels * weights[None]).sum(axis=(1, 2)) / nodes.shape[0]
    return SpectralDensity(grid, density, nodes, weights, sigma, log_scale)


def spectral_density(
    A: LinearOperator,
    *,
    num_runs: int = 10,
    num_steps: int = 80,
    sigma: float | None = None,
    num_points: int = 1024,
    grid: np.ndarray | None = None,
    seed: int = 0,
) -> SpectralDensity:
    """Estimate the spectral density ``(1/D) Σ_j δ(t − λ_j)`` of symmetric ``A`` (Papyan 2020).

    Each of ``num_runs`` Gaussian probes gives a Lanczos quadrature rule whose nodes and
    weights approximate the spectral measure seen from that probe; in expectation over
    probes that measure is ``(1/D) Σ_j δ(t − λ_j)``. Each node becomes a Gaussian of width
    ``σ`` (default: 1/100 of the spread of the nodes) and the runs are averaged, on a
    linear ``grid`` (default: ``num_points`` points, ``5σ`` beyond the extreme nodes).
    Cost: ``num_steps`` products with ``num_runs`` columns.
    """
    nodes, weights = _quadrature_nodes(A, num_runs, num_steps, seed)
    return _smoothed_density(nodes, weights, sigma, num_points, grid, log_scale=False)


def log_spectral_density(
    A: LinearOperator,
    *,
    num_runs: int = 10,
    num_steps: int = 80,
    sigma: float | None = None,
    num_points: int = 1024,
    grid: np.ndarray | None = None,
    floor: float | None = None,
    seed: int = 0,
) -> SpectralDensity:
    """Estimate the density of ``log10|λ|`` over the spectrum of ``A``, for wide spectra.

    The same quadrature as :func:`spectral_density`, with nodes mapped to
    ``u = log10 max(|θ|, floor)`` (``floor`` default: ``10⁻¹² max|θ|``, so exact zeros
    land at the left end) and smoothed in ``u``; the grid and ``σ`` are in decades.
    Negative and positive eigenvalues of equal magnitude coincide. A few Lanczos steps
    resolve the large eigenvalues; a cluster of tiny ones spread over many decades comes
    back as one or two nodes inside it, with the right mass but not the right spread.
    """
    nodes, weights = _quadrature_nodes(A, num_runs, num_steps, seed)
    magnitudes = np.abs(nodes)
    floor = 1e-12 * float(magnitudes.max()) if floor is None else floor
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor!r}.")
    exponents = np.log10(np.maximum(magnitudes, floor))
    return _smoothed_density(exponents, weights, sigma, num_points, grid, log_scale=True)


__all__ = [
    "SpectralDensity",
    "SpectralQuadrature",
    "frobenius_norm_squared",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "log_spectral_density",
    "slq_slogdet",
    "spectral_density",
    "stochastic_lanczos_quadrature",
    "xdiag",
    "xtrace",
]
