"""Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017): ``tr f(A)`` and ``log|det A|``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cola.annotations import PSD
from cola.ops import LinearOperator

from cola_curvature._tracing import is_abstract
from cola_curvature.matfree._arguments import check_positive, check_square
from cola_curvature.matfree._convergence import report_failure, report_failure_traced
from cola_curvature.matfree._random import rademacher
from cola_curvature.matfree.interface import LogdetEstimator
from cola_curvature.matfree.krylov import gauss_quadrature
from cola_curvature.types import Array


@dataclass(frozen=True)
class SLQ(LogdetEstimator):
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) for ``tr f(A)``.

    ``tr f(A) ≈ (D/p) Σ_probes Σ_i τ_i² f(θ_i)``, with ``(θ_i, τ_i)`` the eigenvalues and
    first eigenvector entries of the ``s``-step Lanczos tridiagonal of each Rademacher
    probe. All ``p`` probes run together: ``s`` products with ``p`` columns each.

    Args:
        num_probes: Probes ``p``.
        num_steps: Lanczos steps ``s`` per probe (capped at ``D``).
        seed: Seed of the probes.

    """

    num_probes: int = 20
    num_steps: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("num_probes", self.num_probes)
        check_positive("num_steps", self.num_steps)

    def quadrature(self, A: LinearOperator) -> SpectralQuadrature:
        """Return the quadrature rules of ``A`` (:meth:`SpectralQuadrature.of`)."""
        return SpectralQuadrature.of(A, self)

    def trace_function(self, A: LinearOperator, f: Callable[[Array], Array]) -> Array:
        """Return ``tr f(A) ≈ (D/p) Σ_probes Σ_i τ_i² f(θ_i)`` for symmetric ``A``.

        Rademacher probes (``‖z‖² = D``), each normalised before Lanczos. Unbiased up to
        the quadrature error, which vanishes for polynomials of degree ``< 2s`` and decays
        geometrically in ``s`` for ``f`` analytic on the spectrum (``log`` on a PD
        operator).
        """
        return self.quadrature(A).trace(f, A.xnp)

    def slogdet(self, A: LinearOperator) -> tuple[Array, Array]:
        """Return ``(sign, log|det A|)`` with ``log|det A| = tr log|A|`` by SLQ.

        The sign is ``+1`` for an operator annotated ``PSD`` (``GGN + λI``: the
        log-determinant itself is negative when the eigenvalues are mostly below 1, and
        keeps its sign). For an indefinite operator the sign is ``(−1)^n₋`` with the number
        of negative eigenvalues ``n₋ = tr 1[A < 0]`` estimated by the same quadrature;
        when that estimate is not an integer beyond two standard errors the sign is
        unknown: ``nan`` and a :class:`~cola_curvature.ConvergenceWarning` (use more
        probes and steps; inside ``jax.jit`` the warning comes when the compiled function
        runs). ``cola.linalg.logdet`` returns the ``log|det A|`` part alone, whatever the
        sign.

        Accuracy: Gauss quadrature of ``log|x|`` converges geometrically when the spectrum
        stays away from zero (``GGN + λI``, ``H + λI`` with ``λ`` above ``−λ_min(H)``). An
        operator with eigenvalues at or near zero (an undamped Hessian or GGN: singular
        within rounding, ``log|det| = −∞``) has no meaningful log-determinant, and ``s``
        Lanczos steps do not resolve its null space: the estimate is then a finite number
        set by ``s``. Damp such operators first.
        """
        xnp = A.xnp
        quadrature = self.quadrature(A)
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
        check_square(A)
        probes = rademacher(A, alg.num_probes, alg.seed)
        nodes, weights = gauss_quadrature(A, probes, alg.num_steps)
        return cls(nodes, weights, A.shape[0])

    @classmethod
    def exact(cls, A: LinearOperator) -> SpectralQuadrature:
        """Return the exact rule: nodes all eigenvalues of ``A``, weights ``1/D`` (one "probe").

        ``tr f(A) = Σ_j f(λ_j)`` with no stochastic error, from ``D`` products (one product
        with the ``D`` columns of the identity) and a dense ``eigh``: ``O(D²)`` memory.
        """
        check_square(A)
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
