"""Iterative solvers for ``A X = B`` on symmetric CoLA operators, all columns at once.

Each solver (:class:`~cola_curvature.matfree.cg.CG`,
:class:`~cola_curvature.matfree.minres.MINRES`,
:class:`~cola_curvature.matfree.neumann.Neumann`) is an :class:`IterativeSolver`: its
``iterate(A, B)`` takes a ``(D, k)`` right-hand side and returns ``(X, info)``, every
iteration one product ``A @ V`` with ``k`` columns (a curvature operator shares its
forward pass across them), converged columns frozen (masked with ``where``); ``info``
holds ``iterations`` and the per-column ``relative_residual`` ``‖b − A x‖ / ‖b‖`` the
method tracked. :meth:`IterativeSolver.solve` adds the failure report. SciPy's
``cg``/``minres`` take one right-hand side and NumPy arrays only, and CoLA's CG stops on
``‖r‖ ≤ tol (‖r_0‖ + 1)`` with no report, hence these.

Inside ``jax.jit`` the same code runs as one compiled ``while_loop``: at most
``max_iters`` iterations, ending on the device once every column is below ``tol``
(:func:`~cola_curvature.matfree._loops.iterate`). ``info`` then holds traced arrays, and
the checks that need values move into the compiled function: a column that stops above
``tol`` gives a :class:`~cola_curvature.ConvergenceWarning` at run time (through
``jax.debug.callback``) and, with ``on_failure="raise"``, comes back as NaN. The compiled
loop itself is not reverse-differentiable; ``A⁻¹ @ B`` of :class:`IterativeInverse`
(what ``cola.linalg.inv`` returns) differentiates the solution implicitly instead
(:func:`implicit_solve`), and eager ``jax.grad`` differentiates through the Python loop.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cola.ops import LinearOperator
from plum import dispatch

from cola_curvature._tracing import is_abstract
from cola_curvature.matfree._arguments import check_solver
from cola_curvature.matfree._convergence import report_failure, report_failure_traced
from cola_curvature.matfree.interface import LinearSolver
from cola_curvature.types import Array


def safe_divisor(values: Array, xnp: Any) -> Array:
    """Return ``values`` with zeros replaced by ones (for divisions masked afterwards)."""
    return xnp.where(values == 0, xnp.ones_like(values), values)


class IterativeSolver(LinearSolver):
    """A :class:`LinearSolver` iterating to a relative residual ``‖b − A x‖ ≤ tol ‖b‖``.

    Subclasses are frozen dataclasses with the fields ``tol``, ``max_iters`` and
    ``on_failure`` and implement :meth:`iterate`.
    """

    tol: float
    max_iters: int
    on_failure: str

    def __post_init__(self) -> None:
        check_solver(self.tol, self.max_iters, self.on_failure)

    @abstractmethod
    def iterate(self, A: LinearOperator, B: Array) -> tuple[Array, dict]:
        """Return ``(X, info)`` after at most ``max_iters`` iterations, without a report."""

    def solve(self, A: LinearOperator, B: Array) -> tuple[Array, dict]:
        """Solve ``A X = B``; warn or raise (``on_failure``) when a column stays above ``tol``.

        Inside ``jax.jit`` the warning comes when the compiled function runs, and
        ``on_failure="raise"`` returns the columns above ``tol`` as NaN instead of raising.
        """
        X, info = self.iterate(A, B)
        residual = info["relative_residual"]
        worst = residual.max()
        if is_abstract(worst):
            report_failure_traced(
                ~(worst <= self.tol),
                lambda iterations, value: self._failure_message(iterations, value),
                info["iterations"],
                worst,
            )
            if self.on_failure == "raise":
                X = A.xnp.where((residual <= self.tol)[None, :], X, X + float("nan"))
            return X, info
        if not float(worst) <= self.tol:
            report_failure(self._failure_message(info["iterations"], worst), self.on_failure)
        return X, info

    def _failure_message(self, iterations: Any, worst: Any) -> str:
        """Return the message for a solve that stopped above ``tol``."""
        return (
            f"{type(self).__name__} stopped after {int(iterations)} iterations at relative "
            f"residual {float(worst):.2e} > tol={self.tol:.1e}; raise max_iters, damp the "
            "operator, or choose another alg."
        )


@dataclass(frozen=True)
class KrylovSolver(IterativeSolver):
    """The knobs CG and MINRES share: tolerance, iteration limit, what failure does."""

    tol: float = 1e-10
    max_iters: int = 1000
    on_failure: str = "warn"


def solve(A: LinearOperator, B: Array, alg: LinearSolver) -> tuple[Array, dict]:
    """Return ``alg.solve(A, B)``: ``(X, info)`` with ``A X = B``."""
    return alg.solve(A, B)


@dispatch
def implicit_solve(B: object, matvec: Callable, solve: Callable) -> tuple[Array, dict]:
    """Return ``solve(B)`` differentiable by the implicit function theorem (traced ``B``).

    ``dX = A⁻¹ (dB − dA X)`` with ``A`` the symmetric operator of ``matvec``. Backends
    register the method for their traced arrays (the JAX backend for ``jax.Array``, in
    ``backends/jax/implicit.py``, through plum's global dispatcher, which joins methods
    by name); this one is reached for any other type.

    Raises:
        TypeError: for an array type no backend registered an implicit solve for.

    """
    raise TypeError(
        f"no implicit differentiation of a solve for arrays of type {type(B).__name__}; the "
        "JAX backend registers one for jax.Array when imported (install the 'jax' extra)."
    )


class IterativeInverse(LinearOperator):
    """``A⁻¹`` as a CoLA operator: each ``@`` solves ``A X = B`` with ``alg``.

    ``info`` holds the last solve's iterations and per-column relative residuals (traced
    arrays, valid only inside that trace, when the solve ran inside ``jax.jit``). Inside
    ``jax.jit`` the solve is differentiable (``jax.grad``, also with respect to the
    parameters ``A`` was built from) by the implicit function theorem:
    :func:`implicit_solve`.
    """

    def __init__(self, A: LinearOperator, alg: LinearSolver) -> None:
        super().__init__(A.dtype, A.shape, annotations=set(A.annotations))
        self.A = A
        self.alg = alg
        self.info: dict = {}

    def _matmat(self, X: Array) -> Array:
        A, alg = self.A, self.alg
        if is_abstract(A.xnp.norm(X)):  # inside jax.jit: differentiable by the implicit function
            solution, self.info = implicit_solve(X, lambda V: A @ V, lambda B: alg.solve(A, B))
            return solution
        solution, self.info = alg.solve(A, X)
        return solution

    def _rmatmat(self, X: Array) -> Array:
        return self._matmat(X.T).T

    def __str__(self) -> str:
        return f"{type(self.alg).__name__}({self.A})⁻¹"
