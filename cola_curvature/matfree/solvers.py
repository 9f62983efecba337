"""Iterative solvers for ``A X = B`` on symmetric CoLA operators, all columns at once.

Each solver takes a ``(D, k)`` right-hand side and returns ``(X, info)``; every iteration
is one product ``A @ V`` with ``k`` columns (a curvature operator shares its forward pass
across them). Converged columns are frozen (masked with ``where``). ``info`` holds
``iterations`` and the per-column ``relative_residual`` ``‖b − A x‖ / ‖b‖`` the method
tracked. SciPy's ``cg``/``minres`` take one right-hand side and NumPy arrays only, and
CoLA's CG stops on ``‖r‖ ≤ tol (‖r_0‖ + 1)`` with no report, hence these.

Inside ``jax.jit`` the same code runs as one compiled ``while_loop``: at most
``max_iters`` iterations, ending on the device once every column is below ``tol``
(:func:`~cola_curvature.matfree._loops.iterate`). ``info`` then holds traced arrays, and
the checks that need values move into the compiled function: a column that stops above
``tol`` gives a :class:`~cola_curvature.ConvergenceWarning` at run time (through
``jax.debug.callback``) and, with ``on_failure="raise"``, comes back as NaN; a column
on which CG meets ``pᵀAp ≤ 0`` comes back as NaN (eagerly a ``ValueError``). The
compiled loop itself is not reverse-differentiable; ``A⁻¹ @ B`` of
:class:`IterativeInverse` (what ``cola.linalg.inv`` returns) differentiates the solution
implicitly instead, and eager ``jax.grad`` differentiates through the Python loop.
"""

from __future__ import annotations

from typing import Any

from cola.ops import LinearOperator

from cola_curvature._tracing import is_abstract
from cola_curvature.algorithms import CG, MINRES, Neumann
from cola_curvature.matfree._convergence import report_failure, report_failure_traced
from cola_curvature.matfree._loops import iterate
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
    ``2 ((√κ − 1)/(√κ + 1))^j``. Inside ``jax.jit`` a column meeting ``pᵀAp ≤ 0`` is
    frozen and returned as NaN with residual NaN.

    Raises:
        ValueError: when ``pᵀ A p ≤ 0`` on an active column: ``A`` is not positive
            definite (use :class:`~cola_curvature.algorithms.MINRES`).

    """
    xnp = A.xnp
    b_norm = _safe(xnp.norm(B, axis=0), xnp)
    traced = is_abstract(b_norm)
    zeros = xnp.zeros_like(b_norm)

    def moving(state: tuple) -> Array:
        rr, indefinite = state[3], state[4]
        return (xnp.sqrt(rr) / b_norm > alg.tol) & ~indefinite

    def step(_: Any, state: tuple) -> tuple:
        X, R, P, rr, indefinite = state
        active = moving(state)
        AP = A @ P
        curvature = xnp.sum(P * AP, axis=0)
        negative = active & (curvature <= 0)
        if not traced and bool(xnp.any(negative)):
            raise ValueError(
                "CG met pᵀAp <= 0: the operator is not positive definite. Damp it "
                "(A + λ I) or solve with cola_curvature.MINRES()."
            )
        active = active & ~negative
        alpha = xnp.where(active, rr / _safe(curvature, xnp), zeros)
        X = X + alpha * P
        R = R - alpha * AP
        rr_next = xnp.sum(R * R, axis=0)
        P = R + xnp.where(active, rr_next / _safe(rr, xnp), zeros) * P
        rr = xnp.where(active, rr_next, rr)
        return X, R, P, rr, indefinite | negative

    start = (xnp.zeros_like(B), B, B, xnp.sum(B * B, axis=0), b_norm < 0)
    iterations, (X, _, _, rr, indefinite) = iterate(
        step, start, alg.max_iters, xnp, traced=traced, done=lambda s: ~xnp.any(moving(s))
    )
    residual = xnp.sqrt(rr) / b_norm
    if traced:
        X = xnp.where(indefinite[None, :], X + float("nan"), X)
        residual = xnp.where(indefinite, residual + float("nan"), residual)
    return X, {"iterations": iterations, "relative_residual": residual}


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

    def moving(state: tuple) -> Array:
        beta, phi_bar = state[4], state[8]
        return (phi_bar / b_norm > alg.tol) & (beta > 0)

    def step(_: Any, state: tuple) -> tuple:
        X, r_previous, r_current, y, beta, beta_old, delta_bar, epsilon, phi_bar = state[:9]
        cosine, sine, w, w_previous = state[9:]
        active = moving(state)
        v = y / _safe(beta, xnp)
        y = A @ v
        # the three-term recurrence; β_old = 0 only before the first step
        y = y - xnp.where(beta_old != 0, beta / _safe(beta_old, xnp), zeros) * r_previous
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
        return (X, r_previous, r_current, y, beta, beta_old, delta_bar, epsilon, phi_bar) + (
            cosine,
            sine,
            w,
            w_previous,
        )

    empty = xnp.zeros_like(B)
    start = (empty, B, B, B, beta_first, zeros, zeros, zeros, beta_first, zeros - 1, zeros)
    iterations, state = iterate(
        step,
        start + (empty, empty),
        alg.max_iters,
        xnp,
        traced=is_abstract(beta_first),
        done=lambda s: ~xnp.any(moving(s)),
    )
    return state[0], {"iterations": iterations, "relative_residual": state[8] / b_norm}


def largest_eigenvalue_estimate(A: LinearOperator, num_steps: int = 20, seed: int = 0) -> Any:
    """Return the largest Ritz value of ``num_steps`` Lanczos steps (a lower bound on ``λ_max``).

    A ``float`` eagerly, a scalar array inside ``jax.jit``.
    """
    nodes, _ = gauss_quadrature(A, gaussian(A, 1, seed), num_steps)
    largest = nodes.max()
    return largest if is_abstract(largest) else float(largest)


def neumann(A: LinearOperator, B: Array, alg: Neumann) -> tuple[Array, dict]:
    """Solve ``A X = B`` by the truncated Neumann series (Richardson iteration).

    ``x_{j+1} = x_j + α r_j``, ``r_{j+1} = (I − α A) r_j``, so ``x_J = α Σ_{j<J}
    (I − α A)^j b``. ``α`` defaults to ``1 / θ_max`` (largest Ritz value of 20 Lanczos
    steps); the series diverges when some ``α λ ∉ (0, 2)``, and stops early once the
    residual has grown by ``10³``.
    """
    xnp = A.xnp
    step_size = alg.step if alg.step is not None else 1 / largest_eigenvalue_estimate(A)
    b_norm = _safe(xnp.norm(B, axis=0), xnp)

    def step(_: Any, state: tuple) -> tuple:
        X, R, residual = state
        active = residual > alg.tol
        X = X + xnp.where(active, step_size + 0 * residual, 0 * residual) * R
        R = xnp.where(active[None, :], R - step_size * (A @ R), R)
        return X, R, xnp.norm(R, axis=0) / b_norm

    def done(state: tuple) -> Array:
        residual = state[2]
        return ~xnp.any(residual > alg.tol) | (residual.max() > 1e3)

    start = (xnp.zeros_like(B), B, xnp.norm(B, axis=0) / b_norm)
    iterations, (X, _, residual) = iterate(
        step, start, alg.max_iters, xnp, traced=is_abstract(b_norm), done=done
    )
    return X, {"iterations": iterations, "relative_residual": residual, "step": step_size}


_SOLVERS = {CG: conjugate_gradient, MINRES: minres, Neumann: neumann}


def _failure_message(alg: CG | MINRES | Neumann, iterations: Any, worst: Any) -> str:
    """Return the message for a solve that stopped above ``alg.tol``."""
    return (
        f"{type(alg).__name__} stopped after {int(iterations)} iterations at relative "
        f"residual {float(worst):.2e} > tol={alg.tol:.1e}; raise max_iters, damp the "
        "operator, or choose another alg."
    )


def solve(A: LinearOperator, B: Array, alg: CG | MINRES | Neumann) -> tuple[Array, dict]:
    """Solve ``A X = B`` with ``alg``; warn or raise (``alg.on_failure``) above ``alg.tol``.

    Inside ``jax.jit`` the warning comes when the compiled function runs, and
    ``on_failure="raise"`` returns the columns above ``tol`` as NaN instead of raising.
    """
    X, info = _SOLVERS[type(alg)](A, B, alg)
    residual = info["relative_residual"]
    worst = residual.max()
    if is_abstract(worst):
        report_failure_traced(
            ~(worst <= alg.tol),
            lambda iterations, value: _failure_message(alg, iterations, value),
            info["iterations"],
            worst,
        )
        if alg.on_failure == "raise":
            X = A.xnp.where((residual <= alg.tol)[None, :], X, X + float("nan"))
        return X, info
    if not float(worst) <= alg.tol:
        report_failure(_failure_message(alg, info["iterations"], worst), alg.on_failure)
    return X, info


class IterativeInverse(LinearOperator):
    """``A⁻¹`` as a CoLA operator: each ``@`` solves ``A X = B`` with ``alg``.

    ``info`` holds the last solve's iterations and per-column relative residuals (traced
    arrays, valid only inside that trace, when the solve ran inside ``jax.jit``). Inside
    ``jax.jit`` the solve is differentiable (``jax.grad``, also with respect to the
    parameters ``A`` was built from) by the implicit function theorem:
    :func:`~cola_curvature.backends.jax.implicit.implicit_solve`.
    """

    def __init__(self, A: LinearOperator, alg: CG | MINRES | Neumann) -> None:
        super().__init__(A.dtype, A.shape, annotations=set(A.annotations))
        self.A = A
        self.alg = alg
        self.info: dict = {}

    def _matmat(self, X: Array) -> Array:
        A, alg = self.A, self.alg
        if is_abstract(A.xnp.norm(X)):  # inside jax.jit: differentiable by the implicit function
            from cola_curvature.backends.jax.implicit import implicit_solve

            solution, self.info = implicit_solve(lambda V: A @ V, X, lambda B: solve(A, B, alg))
            return solution
        solution, self.info = solve(A, X, alg)
        return solution

    def _rmatmat(self, X: Array) -> Array:
        return self._matmat(X.T).T

    def __str__(self) -> str:
        return f"{type(self.alg).__name__}({self.A})⁻¹"
