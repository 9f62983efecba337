"""Randomized estimators of traces, diagonals, norms, log-determinants and spectral densities.

All work on any square, symmetric CoLA operator (torch or JAX) through ``A @ V`` with many
columns, so a curvature operator shares one forward pass across a whole block of test
vectors. Each takes a budget of matrix-vector products and a seed; the global RNG state
is left alone. The dispatch rules in :mod:`dispatch_rules` route ``cola.linalg.trace``,
``diag`` and ``logdet`` of the matrix-free curvature operators here.

Sources: Hutchinson (1989); Hutch++ (Meyer, Musco, Musco & Woodruff 2021); XTrace and
XDiag (Epperly, Tropp & Webber 2024); stochastic Lanczos quadrature (Ubaru, Chen & Saad
2017); spectral densities (Papyan 2020; Ghorbani, Krishnan & Xiao 2019). Written on
CoLA's backend functions rather than calling ``matfree`` so one code path serves both
frameworks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from cola.annotations import PSD
from cola.ops import LinearOperator

from cola_curvature._tracing import is_abstract, is_traced
from cola_curvature.algorithms import SLQ, Hutchinson, HutchPlusPlus, XTrace, check_positive
from cola_curvature.matfree._convergence import report_failure, report_failure_traced
from cola_curvature.matfree._random import gaussian, rademacher
from cola_curvature.matfree.krylov import gauss_quadrature

Array = Any


def _check_square(A: LinearOperator) -> None:
    """Raise ``ValueError`` unless ``A`` is a square CoLA operator."""
    if not isinstance(A, LinearOperator) or A.shape[0] != A.shape[1]:
        raise ValueError(f"expected a square CoLA LinearOperator, got {type(A).__name__}.")


def hutchinson_trace(A: LinearOperator, alg: Hutchinson | None = None) -> Array:
    """Return ``(1/m) Σ_j z_jᵀ A z_j`` with Rademacher ``z_j`` (unbiased; ``m`` products)."""
    _check_square(A)
    alg = alg or Hutchinson()
    Z = rademacher(A, alg.num_matvecs, alg.seed)
    return A.xnp.sum(Z * (A @ Z), axis=(0, 1)) / alg.num_matvecs


def hutchinson_diagonal(A: LinearOperator, alg: Hutchinson | None = None) -> Array:
    """Return ``(1/m) Σ_j z_j ⊙ A z_j`` with Rademacher ``z_j`` (unbiased; ``m`` products)."""
    _check_square(A)
    alg = alg or Hutchinson()
    Z = rademacher(A, alg.num_matvecs, alg.seed)
    return A.xnp.sum(Z * (A @ Z), axis=1) / alg.num_matvecs


def frobenius_norm_squared(A: LinearOperator, alg: Hutchinson | None = None) -> Array:
    """Return ``(1/m) Σ_j ‖A z_j‖²``, unbiased for ``‖A‖_F² = tr(AᵀA)`` (``m`` products)."""
    _check_square(A)
    alg = alg or Hutchinson()
    Z = rademacher(A, alg.num_matvecs, alg.seed)
    return A.xnp.sum((A @ Z) ** 2, axis=(0, 1)) / alg.num_matvecs


def hutchpp_trace(A: LinearOperator, alg: HutchPlusPlus | None = None) -> Array:
    """Return the Hutch++ estimate ``tr(QᵀAQ) + (1/g) Σ_j g̃_jᵀ A g̃_j``, ``g̃ = (I − QQᵀ) g``.

    ``Q = orth(A S)`` for ``s = ⌊m/3⌋`` Rademacher columns ``S`` (at most ``D``), and
    ``g = m − 2s`` Rademacher probes ``G`` of the complement. Products: ``A S``, ``A Q``,
    ``A G̃``. Exact when ``rank A ≤ s``.
    """
    _check_square(A)
    alg = alg or HutchPlusPlus()
    xnp = A.xnp
    sketch_size = min(alg.num_matvecs // 3, A.shape[0])
    probes = alg.num_matvecs - 2 * sketch_size
    S = rademacher(A, sketch_size + probes, alg.seed)
    G, S = S[:, sketch_size:], S[:, :sketch_size]
    Q, _ = xnp.qr(A @ S, full_matrices=False)
    estimate = xnp.sum(Q * (A @ Q), axis=(0, 1))
    if probes == 0:
        return estimate
    G = G - Q @ (Q.T @ G)
    return estimate + xnp.sum(G * (A @ G), axis=(0, 1)) / probes


@dataclass(frozen=True)
class _ExchangeableSketch:
    """The shared quantities of XTrace and XDiag for ``k`` test vectors ``Ω``.

    ``Y = A Ω = Q R``; ``s_i`` is the normalised ``i``-th column of ``R⁻ᵀ``, so that the
    projector onto the sketch without ``ω_i`` is ``Q_i Q_iᵀ = Q (I − s_i s_iᵀ) Qᵀ``;
    ``Z = A Q``.
    """

    omega: Array
    Y: Array
    Q: Array
    R: Array
    S: Array
    Z: Array


def _exchangeable_sketch(A: LinearOperator, alg: XTrace) -> _ExchangeableSketch:
    """Return the XTrace/XDiag sketch with ``k = min(⌊m/2⌋, D)`` Rademacher test vectors."""
    xnp = A.xnp
    num_vectors = min(alg.num_matvecs // 2, A.shape[0])
    omega = rademacher(A, num_vectors, alg.seed)
    Y = A @ omega
    Q, R = xnp.qr(Y, full_matrices=False)
    R_inverse_t = xnp.inv(R).T
    S = R_inverse_t / xnp.norm(R_inverse_t, axis=0, keepdims=True)
    return _ExchangeableSketch(omega, Y, Q, R, S, A @ Q)


def xtrace(A: LinearOperator, alg: XTrace | None = None) -> Array:
    """Return the XTrace estimate: the mean over ``i`` of Hutch++ with ``ω_i`` left out.

    Estimate ``i``: ``tr(Q_iᵀ A Q_i) + ω̃_iᵀ A ω̃_i`` with ``ω̃_i = (I − Q_iQ_iᵀ) ω_i``. With
    ``H = QᵀAQ``, ``c_i = Qᵀω_i`` and ``d_i = c_i − (s_iᵀc_i) s_i``:
    ``tr(Q_iᵀAQ_i) = tr H − s_iᵀHs_i`` and, ``A`` being symmetric,
    ``ω̃_iᵀAω̃_i = ω_iᵀy_i − 2 r_iᵀd_i + d_iᵀHd_i`` (``y_i = Aω_i``, ``r_i = Qᵀy_i`` the
    ``i``-th column of ``R``). Products: ``A Ω`` and ``A Q``, ``k`` columns each.
    """
    _check_square(A)
    xnp = A.xnp
    sketch = _exchangeable_sketch(A, alg or XTrace())
    Q, R, S = sketch.Q, sketch.R, sketch.S
    H = Q.T @ sketch.Z
    if Q.shape[1] == A.shape[0]:  # the sketch spans R^D: tr A = tr(QᵀAQ) exactly
        return xnp.sum(xnp.diag(H), axis=0)
    C = Q.T @ sketch.omega
    D = C - S * xnp.sum(S * C, axis=0, keepdims=True)
    estimates = (
        xnp.sum(xnp.diag(H), axis=0)
        - xnp.sum(S * (H @ S), axis=0)
        + xnp.sum(sketch.omega * sketch.Y, axis=0)
        - 2 * xnp.sum(R * D, axis=0)
        + xnp.sum(D * (H @ D), axis=0)
    )
    return xnp.mean(estimates)


def xdiag(A: LinearOperator, alg: XTrace | None = None) -> Array:
    """Return the XDiag estimate: the mean over ``i`` of Diag++ with ``ω_i`` left out.

    Estimate ``i``: ``diag(Q_iQ_iᵀA) + ω_i ⊙ (I − Q_iQ_iᵀ) A ω_i`` (Rademacher, so
    ``ω_i ⊙ ω_i = 1``). Averaged over ``i`` with ``Q_iQ_iᵀ = Q(I − s_is_iᵀ)Qᵀ`` and
    ``QᵀA = Zᵀ``: ``rowsum(Q ⊙ Z) − (1/k) rowsum(QS ⊙ ZS) + (1/k) rowsum(Ω ⊙ (Y − Q(R −
    S diag(SᵀR))))``. Products: ``A Ω`` and ``A Q``.
    """
    _check_square(A)
    xnp = A.xnp
    sketch = _exchangeable_sketch(A, alg or XTrace())
    Q, R, S = sketch.Q, sketch.R, sketch.S
    num_vectors = S.shape[1]
    if num_vectors == A.shape[0]:  # the sketch spans R^D: diag A = diag(QQᵀA) exactly
        return xnp.sum(Q * sketch.Z, axis=1)
    deflated = R - S * xnp.sum(S * R, axis=0, keepdims=True)
    complement = sketch.Y - Q @ deflated
    return (
        xnp.sum(Q * sketch.Z, axis=1)
        - xnp.sum((Q @ S) * (sketch.Z @ S), axis=1) / num_vectors
        + xnp.sum(sketch.omega * complement, axis=1) / num_vectors
    )


@dataclass(frozen=True)
class SpectralQuadrature:
    """The Lanczos quadrature rules of ``p`` Rademacher probes of a symmetric ``A``.

    ``tr f(A) ≈ (D/p) Σ_probes Σ_i τ_i² f(θ_i)`` for any ``f``, from one Lanczos run. The
    rule of ``c A + δ I`` is that of ``A`` with nodes ``c θ + δ`` (Krylov spaces do not
    change under scaling and shifts), so one run serves a whole family of damped operators,
    and the estimate is differentiable in ``c`` and ``δ``.

    Attributes:
        nodes: Ritz values ``θ`` ``(p, s)``.
        weights: ``τ²`` ``(p, s)``; zero on the padding after a breakdown.
        dimension: ``D``.
        is_exact: Whether the rule is :meth:`exact` (all eigenvalues, no stochastic error).

    """

    nodes: Array
    weights: Array
    dimension: int
    is_exact: bool = False

    @classmethod
    def of(cls, A: LinearOperator, alg: SLQ) -> SpectralQuadrature:
        """Return the rules of ``A`` for ``alg.num_probes`` probes of ``alg.num_steps`` steps."""
        _check_square(A)
        probes = rademacher(A, alg.num_probes, alg.seed)
        nodes, weights = gauss_quadrature(A, probes, alg.num_steps)
        return cls(nodes, weights, A.shape[0])

    @classmethod
    def exact(cls, A: LinearOperator) -> SpectralQuadrature:
        """Return the exact rule: nodes all eigenvalues of ``A``, weights ``1/D`` (one "probe").

        ``tr f(A) = Σ_j f(λ_j)`` with no stochastic error, from ``D`` products (one product
        with the ``D`` columns of the identity) and a dense ``eigh``: ``O(D²)`` memory.
        """
        _check_square(A)
        xnp = A.xnp
        dimension = A.shape[0]
        dense = A @ xnp.eye(dimension, dimension, dtype=A.dtype, device=A.device)
        eigenvalues = xnp.eigh((dense + dense.T) / 2)[0]
        weights = xnp.ones_like(eigenvalues) / dimension
        return cls(eigenvalues[None], weights[None], dimension, is_exact=True)

    def per_probe(self, f: Callable[[Array], Array], xnp: Any) -> Array:
        """Return the ``p`` single-probe estimates ``D Σ_i τ_i² f(θ_i)``.

        Nodes of zero weight are not evaluated (``f`` may be singular there).
        """
        keep = self.weights > float(xnp.finfo(self.weights.dtype).eps) ** 2
        values = f(xnp.where(keep, self.nodes, xnp.ones_like(self.nodes)))
        terms = xnp.where(keep, self.weights * values, 0 * values)
        return self.dimension * xnp.sum(terms, axis=1)

    def trace(self, f: Callable[[Array], Array], xnp: Any) -> Array:
        """Return the estimate of ``tr f(A)``, the mean of :meth:`per_probe`."""
        return xnp.mean(self.per_probe(f, xnp))

    def standard_error(self, f: Callable[[Array], Array], xnp: Any) -> Array:
        """Return the standard error of :meth:`trace` over the probes.

        The spread of the single-probe estimates over ``√p``: the Hutchinson part of the
        error; the quadrature part vanishes as the Lanczos steps grow. ``0`` for the exact
        rule; ``inf`` for one random probe, whose spread is unknown.
        """
        estimates = self.per_probe(f, xnp)
        count = estimates.shape[0]
        if self.is_exact:
            return 0 * estimates[0]
        if count == 1:
            return estimates[0] * 0 + float("inf")
        spread = xnp.sum((estimates - xnp.mean(estimates)) ** 2) / (count - 1)
        return xnp.sqrt(spread / count)


def stochastic_lanczos_quadrature(
    A: LinearOperator, f: Callable[[Array], Array], alg: SLQ | None = None
) -> Array:
    """Return ``tr f(A) ≈ (D/p) Σ_probes Σ_i τ_i² f(θ_i)`` for symmetric ``A``.

    Rademacher probes (``‖z‖² = D``), each normalised before Lanczos. Unbiased up to the
    quadrature error, which vanishes for polynomials of degree ``< 2s`` and decays
    geometrically in ``s`` for ``f`` analytic on the spectrum (``log`` on a PD operator).
    """
    return SpectralQuadrature.of(A, alg or SLQ()).trace(f, A.xnp)


def slq_slogdet(A: LinearOperator, alg: SLQ | None = None) -> tuple[Array, Array]:
    """Return ``(sign, log|det A|)`` with ``log|det A| = tr log|A|`` by SLQ.

    The sign is ``+1`` for an operator annotated ``PSD`` (``GGN + λI``: the log-determinant
    itself is negative when the eigenvalues are mostly below 1, and keeps its sign). For
    an indefinite operator the sign is ``(−1)^n₋`` with the number of negative
    eigenvalues ``n₋ = tr 1[A < 0]`` estimated by the same quadrature; when that estimate
    is not an integer beyond two standard errors the sign is unknown: ``nan`` and a
    :class:`~cola_curvature.ConvergenceWarning` (use more probes and steps; inside
    ``jax.jit`` the warning comes when the compiled function runs).
    ``cola.linalg.logdet`` returns the ``log|det A|`` part alone, whatever the sign.

    Accuracy: Gauss quadrature of ``log|x|`` converges geometrically when the spectrum
    stays away from zero (``GGN + λI``, ``H + λI`` with ``λ`` above ``−λ_min(H)``). An
    operator with eigenvalues at or near zero (an undamped Hessian or GGN: singular
    within rounding, ``log|det| = −∞``) has no meaningful log-determinant, and ``s``
    Lanczos steps do not resolve its null space: the estimate is then a finite number
    set by ``s``. Damp such operators first.
    """
    xnp = A.xnp
    quadrature = SpectralQuadrature.of(A, alg or SLQ())
    log_abs = xnp.mean(quadrature.per_probe(lambda x: xnp.log(xnp.abs(x)), xnp))
    if A.isa(PSD):
        return 1 + 0 * log_abs, log_abs

    def negative_indicator(x: Array) -> Array:
        return (x < 0) * (1 + 0 * x)

    count = quadrature.trace(negative_indicator, xnp)
    error = quadrature.standard_error(negative_indicator, xnp)
    nearest = (count + 0.5) // 1
    unknown = xnp.abs(count - nearest) + 2 * error >= 0.5
    sign = 1 - 2 * (nearest % 2) + 0 * log_abs
    if is_abstract(unknown):
        report_failure_traced(unknown, _unknown_sign_message, count, error)
    elif bool(unknown):
        report_failure(_unknown_sign_message(count, error), "warn")
    return xnp.where(unknown, sign + float("nan"), sign), log_abs


def _unknown_sign_message(count: Any, error: Any) -> str:
    """Return the warning for a determinant sign SLQ cannot settle."""
    return (
        f"SLQ estimates {float(count):.2f} ± {float(error):.2f} negative eigenvalues, too "
        "uncertain for the sign of the determinant: slogdet returns the sign as nan and "
        "log|det A| as estimated (cola.linalg.logdet returns that log|det A|, without a "
        "sign); raise SLQ(num_probes=..., num_steps=...) to settle the sign."
    )


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
    _check_square(A)
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
