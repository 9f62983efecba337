"""Iterative solvers for ``A X = B`` on symmetric CoLA operators, all columns at once.

Each solver takes a ``(D, k)`` right-hand side and returns ``(X, info)``; every iteration
is one product ``A @ V`` with ``k`` columns (a curvature operator shares its forward pass
across them). Converged columns are frozen. ``info`` holds ``iterations`` and the
per-column ``relative_residual`` ``‖b − A x‖ / ‖b‖`` the method tracked. SciPy's
``cg``/``minres`` take one right-hand side and NumPy arrays only, and CoLA's CG stops on
``‖r‖ ≤ tol (‖r_0‖ + 1)`` with no report, hence these.
"""

from __future__ import annotations

from typing import Any

from cola.ops import LinearOperator

from cola_curvature.algorithms import CG, MINRES, Neumann
from cola_curvature.matfree._convergence import report_failure
from cola_curvature.matfree._random import gaussian
from cola_curvature.matfree.krylov import gauss_quadrature

Array = Any


def _safe(values: Array, xnp: Any) -> Array:
    """Return ``values`` with zeros replaced by ones (for divisions masked afterwards)."""
    return xnp.where(values == 0, xnp.ones_like(values), values)


def conjugate_gradient(A: LinearOperator, B: Array, alg: CG) -> tuple[Array, dict]:
    """Solve ``A X = B`` for symmetric positive definite ``A`` by conjugate gradients.

    Per column: ``α = rᵀr / pᵀAp``, ``x += α p``, ``r −= α A p``, ``p = r + (r'ᵀr'/rᵀr) p``
    (Hestenes & Stiefel 1952); the error in the ``A``-norm falls at least as
    ``2 ((√κ − 1)/(√κ + 1))^j``.

    Raises:
        ValueError: when ``pᵀ A p ≤ 0`` on an active column: ``A`` is not positive
            definite (use :class:`~cola_curvature.algorithms.MINRES`).

    """
    xnp = A.xnp
    b_norm = _safe(xnp.norm(B, axis=0), xnp)
    X = xnp.zeros_like(B)
    R = B
    P = R
    rr = xnp.sum(R * R, axis=0)
    iterations = 0
    for _ in range(alg.max_iters):
        active = xnp.sqrt(rr) / b_norm > alg.tol
        if not bool(xnp.any(active)):
            break
        AP = A @ P
        curvature = xnp.sum(P * AP, axis=0)
        if bool(xnp.any(active & (curvature <= 0))):
            raise ValueError(
                "CG met pᵀAp <= 0: the operator is not positive definite. Damp it "
                "(A + λ I) or solve with cola_curvature.MINRES()."
            )
        alpha = xnp.where(active, rr / _safe(curvature, xnp), xnp.zeros_like(rr))
        X = X + alpha * P
        R = R - alpha * AP
        rr_next = xnp.sum(R * R, axis=0)
        P = R + xnp.where(active, rr_next / _safe(rr, xnp), xnp.zeros_like(rr)) * P
        rr = xnp.where(active, rr_next, rr)
        iterations += 1
    return X, {"iterations": iterations, "relative_residual": xnp.sqrt(rr) / b_norm}


def minres(A: LinearOperator, B: Array, alg: MINRES) -> tuple[Array, dict]:
    """Solve ``A X = B`` for symmetric (possibly indefinite, nonsingular) ``A`` by MINRES.

    Lanczos on ``A`` with the QR factorisation of its tridiagonal updated by Givens
    rotations (Paige & Saunders 1975, as in SciPy's ``minres`` without preconditioner):
    ``x_j`` minimises ``‖b − A x‖`` over the ``j``-dimensional Krylov space, and the
    rotated right-hand side ``φ̄_j`` is that residual's norm.
    """
    xnp = A.xnp
    eps = float(xnp.finfo(A.dtype).eps)
    beta_first = xnp.norm(B, axis=0)
    b_norm = _safe(beta_first, xnp)
    zeros = xnp.zeros_like(beta_first)
    X = xnp.zeros_like(B)
    r_previous, r_current, y = B, B, B
    beta, beta_old = beta_first, zeros
    delta_bar, epsilon = zeros, zeros
    phi_bar = beta_first
    cosine, sine = zeros - 1, zeros
    w, w_previous = xnp.zeros_like(B), xnp.zeros_like(B)
    iterations = 0
    for step in range(alg.max_iters):
        active = (phi_bar / b_norm > alg.tol) & (beta > 0)
        if not bool(xnp.any(active)):
            break
        v = y / _safe(beta, xnp)
        y = A @ v
        if step > 0:
            y = y - (beta / _safe(beta_old, xnp)) * r_previous
        alpha = xnp.sum(v * y, axis=0)
        y = y - (alpha / _safe(beta, xnp)) * r_current
        r_previous, r_current = r_current, y
        beta_old, beta = beta, xnp.norm(y, axis=0)
        epsilon_old = epsilon
        delta = cosine * delta_bar + sine * alpha
        gamma_bar = sine * delta_bar - cosine * alpha
        epsilon = sine * beta
        delta_bar = -cosine * beta
        gamma = xnp.maximum(xnp.sqrt(gamma_bar**2 + beta**2), zeros + eps)
        cosine, sine = gamma_bar / gamma, beta / gamma
        phi = cosine * phi_bar
        w_older, w_previous = w_previous, w
        w = (v - epsilon_old * w_older - delta * w_previous) / gamma
        X = X + xnp.where(active, phi, zeros) * w
        phi_bar = xnp.where(active, sine * phi_bar, phi_bar)
        iterations += 1
    return X, {"iterations": iterations, "relative_residual": phi_bar / b_norm}


def largest_eigenvalue_estimate(A: LinearOperator, num_steps: int = 20, seed: int = 0) -> float:
    """Return the largest Ritz value of ``num_steps`` Lanczos steps (a lower bound on ``λ_max``)."""
    nodes, _ = gauss_quadrature(A, gaussian(A, 1, seed), num_steps)
    return float(nodes.max())


def neumann(A: LinearOperator, B: Array, alg: Neumann) -> tuple[Array, dict]:
    """Solve ``A X = B`` by the truncated Neumann series (Richardson iteration).

    ``x_{j+1} = x_j + α r_j``, ``r_{j+1} = (I − α A) r_j``, so ``x_J = α Σ_{j<J}
    (I − α A)^j b``. ``α`` defaults to ``1 / θ_max`` (largest Ritz value of 20 Lanczos
    steps); the series diverges when some ``α λ ∉ (0, 2)``, and stops early once the
    residual has grown by ``10³``.
    """
    xnp = A.xnp
    step = alg.step if alg.step is not None else 1 / largest_eigenvalue_estimate(A)
    b_norm = _safe(xnp.norm(B, axis=0), xnp)
    X = xnp.zeros_like(B)
    R = B
    residual = xnp.norm(R, axis=0) / b_norm
    iterations = 0
    for _ in range(alg.max_iters):
        active = residual > alg.tol
        if not bool(xnp.any(active)) or float(residual.max()) > 1e3:
            break
        X = X + xnp.where(active, step + 0 * residual, 0 * residual) * R
        R = xnp.where(active[None, :], R - step * (A @ R), R)
        residual = xnp.norm(R, axis=0) / b_norm
        iterations += 1
    return X, {"iterations": iterations, "relative_residual": residual, "step": step}


_SOLVERS = {CG: conjugate_gradient, MINRES: minres, Neumann: neumann}


def solve(A: LinearOperator, B: Array, alg: CG | MINRES | Neumann) -> tuple[Array, dict]:
    """Solve ``A X = B`` with ``alg``; warn or raise (``alg.on_failure``) above ``alg.tol``."""
    X, info = _SOLVERS[type(alg)](A, B, alg)
    worst = float(info["relative_residual"].max())
    if not worst <= alg.tol:
        report_failure(
            f"{type(alg).__name__} stopped after {info['iterations']} iterations at relative "
            f"residual {worst:.2e} > tol={alg.tol:.1e}; raise max_iters, damp the operator, "
            "or choose another alg.",
            alg.on_failure,
        )
    return X, info


class IterativeInverse(LinearOperator):
    """``A⁻¹`` as a CoLA operator: each ``@`` solves ``A X = B`` with ``alg``.

    ``info`` holds the last solve's iterations and per-column relative residuals.
    """

    def __init__(self, A: LinearOperator, alg: CG | MINRES | Neumann) -> None:
        super().__init__(A.dtype, A.shape, annotations=set(A.annotations))
        self.A = A
        self.alg = alg
        self.info: dict = {}

    def _matmat(self, X: Array) -> Array:
        solution, self.info = solve(self.A, X, self.alg)
        return solution

    def _rmatmat(self, X: Array) -> Array:
        return self._matmat(X.T).T

    def __str__(self) -> str:
        return f"{type(self.alg).__name__}({self.A})⁻¹"
