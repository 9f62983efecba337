"""Algorithm choices for the matrix-free rules, passed as ``alg=`` to ``cola.linalg`` functions.

Each is a frozen dataclass holding the knobs of one method; the rules in
:mod:`dispatch_rules` read them. Estimators take a budget ``num_matvecs`` (columns
multiplied by the operator in total, in a few products with many columns each, so a
curvature operator shares each forward pass across them) and a ``seed`` (a private
generator: the global RNG state is left alone). The defaults are the ones the accuracy
table in ``benchmarks/RESULTS.md`` supports.
"""

from __future__ import annotations

from dataclasses import dataclass

from cola.linalg import Algorithm

ON_FAILURE = ("warn", "raise")


def _is_integer_at_least(value: object, minimum: int) -> bool:
    """Return whether ``value`` is an ``int`` (not a ``bool``) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_positive(name: str, value: int) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive integer."""
    if not _is_integer_at_least(value, 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_budget(method: str, num_matvecs: int, minimum: int) -> None:
    """Raise ``ValueError`` unless ``method`` gets an integer budget of at least ``minimum``."""
    if not _is_integer_at_least(num_matvecs, minimum):
        raise ValueError(
            f"{method} needs an integer num_matvecs >= {minimum}, got {num_matvecs!r}."
        )


def _check_solver(tol: float, max_iters: int, on_failure: str) -> None:
    """Raise ``ValueError`` on a solver configuration that cannot run."""
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}.")
    check_positive("max_iters", max_iters)
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}.")


@dataclass(frozen=True)
class _KrylovSolver(Algorithm):
    """The knobs CG and MINRES share: tolerance, iteration limit, what failure does."""

    tol: float = 1e-10
    max_iters: int = 1000
    on_failure: str = "warn"

    def __post_init__(self) -> None:
        _check_solver(self.tol, self.max_iters, self.on_failure)


@dataclass(frozen=True)
class CG(_KrylovSolver):
    """Conjugate gradients for ``A x = b`` with ``A`` symmetric positive definite.

    Stops a column when ``‖b − A x‖ ≤ tol ‖b‖`` (recursively updated residual); all
    columns of ``B`` are solved together, one product with ``A`` per iteration. Inside
    ``jax.jit`` the iterations are one compiled ``while_loop`` (at most ``max_iters``,
    ending once every column is below ``tol``), and ``jax.grad`` of ``inv(A) @ b``
    differentiates the solution implicitly (one more solve) rather than the loop.

    Args:
        tol: Relative residual at which a column has converged.
        max_iters: Iterations (products with ``A``) at most.
        on_failure: ``"warn"`` (a :class:`~cola_curvature.ConvergenceWarning`
            naming the residual reached) or ``"raise"`` (a
            :class:`~cola_curvature.ConvergenceError`) when a column has not
            converged after ``max_iters`` iterations. Inside ``jax.jit`` the warning
            comes when the compiled function runs (``jax.debug.callback``), and
            ``"raise"`` returns the unconverged columns as NaN.

    """


@dataclass(frozen=True)
class MINRES(_KrylovSolver):
    """MINRES (Paige & Saunders 1975) for ``A x = b`` with ``A`` symmetric, possibly indefinite.

    Minimises ``‖b − A x‖`` over the Krylov space; the residual norm it tracks is the
    stopping criterion ``‖b − A x‖ ≤ tol ‖b‖``. Knobs as in :class:`CG`.
    """


@dataclass(frozen=True)
class Neumann(Algorithm):
    """Truncated Neumann series ``A⁻¹ b ≈ α Σ_{j<J} (I − α A)^j b`` (Richardson iteration).

    Converges when every eigenvalue ``λ`` of ``A`` satisfies ``0 < α λ < 2``; with
    ``step=None``, ``α = 1 / λ_max`` with ``λ_max`` from a few Lanczos steps. The error
    contracts by ``max|1 − α λ|`` per term, i.e. by ``1 − λ_min/λ_max``: slow on
    ill-conditioned operators, which is why :class:`CG` is the default.

    Args:
        tol: Relative residual at which a column has converged.
        max_iters: Terms ``J`` of the series at most.
        step: ``α``; ``None`` estimates it.
        on_failure: As in :class:`CG`.

    """

    tol: float = 1e-10
    max_iters: int = 1000
    step: float | None = None
    on_failure: str = "warn"

    def __post_init__(self) -> None:
        _check_solver(self.tol, self.max_iters, self.on_failure)
        if self.step is not None and not self.step > 0:
            raise ValueError(f"step must be > 0 or None, got {self.step!r}.")


@dataclass(frozen=True)
class LanczosEig(Algorithm):
    """Lanczos with full reorthogonalisation for extreme eigenpairs of a symmetric operator.

    Runs until the ``k`` wanted Ritz pairs have residuals ``‖A y − θ y‖ ≤ tol · max|θ|``;
    when the Krylov space becomes invariant (breakdown), it restarts from a random
    vector orthogonal to all previous ones, so repeated eigenvalues are found with their
    multiplicity. One product with one column per step. Inside ``jax.jit`` it runs
    exactly ``min(max_iters, D)`` steps and checks ``tol`` when the compiled function runs.

    Args:
        tol: Relative Ritz residual at which an eigenpair has converged (``None``:
            ``ε^(2/3)`` of the dtype).
        max_iters: Lanczos steps at most (capped at ``D``).
        seed: Seed of the start vector.
        on_failure: As in :class:`CG`.

    """

    tol: float | None = None
    max_iters: int = 500
    seed: int = 0
    on_failure: str = "warn"

    def __post_init__(self) -> None:
        _check_solver(1.0 if self.tol is None else self.tol, self.max_iters, self.on_failure)


@dataclass(frozen=True)
class LanczosFunction(Algorithm):
    """Lanczos for ``f(A) v`` of a symmetric operator (``sqrt``, ``isqrt``, any spectral ``f``).

    ``f(A) v ≈ ‖v‖ Q_s f(T_s) e₁`` from ``s`` Lanczos steps started at ``v / ‖v‖`` (fully
    reorthogonalised), exact for polynomials of degree ``< s``. Stops once the result
    changes by at most ``tol`` (relative) from one step to the next, in every column, or
    after ``min(max_iters, D)`` steps (then warns or raises per ``on_failure``). One
    product with ``k`` columns per step, ``O(s D k)`` memory for the basis.

    Args:
        tol: Relative change of ``f(A) v`` between steps at which a column has converged.
        max_iters: Lanczos steps at most (capped at ``D``).
        on_failure: As in :class:`CG`.

    """

    tol: float = 1e-10
    max_iters: int = 1000
    on_failure: str = "warn"

    def __post_init__(self) -> None:
        _check_solver(self.tol, self.max_iters, self.on_failure)


@dataclass(frozen=True)
class Hutchinson(Algorithm):
    """Hutchinson's estimator: ``tr A ≈ (1/m) Σ_j z_jᵀ A z_j``, ``diag A ≈ (1/m) Σ_j z_j ⊙ A z_j``.

    Rademacher ``z_j``; unbiased, error ``O(‖A‖_F / √m)``. One product with ``m`` columns.
    """

    num_matvecs: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("num_matvecs", self.num_matvecs)


@dataclass(frozen=True)
class HutchPlusPlus(Algorithm):
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched range, Hutchinson on the rest.

    ``m/3`` columns sketch ``Q = orth(A S)``; ``tr A ≈ tr(Qᵀ A Q) + Hutchinson of
    (I − QQᵀ) A (I − QQᵀ)`` with the remaining columns. Unbiased; exact when
    ``rank A ≤ m/3``; error ``O(‖A‖_* / m)`` for PSD ``A``. Needs ``m ≥ 3``.
    """

    num_matvecs: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        _check_budget("Hutch++", self.num_matvecs, 3)


@dataclass(frozen=True)
class XTrace(Algorithm):
    """XTrace / XDiag (Epperly, Tropp & Webber 2024): Hutch++ made exchangeable.

    ``k = m/2`` test vectors ``ω_i`` sketch ``Q = orth(A Ω)``; each ``ω_i`` in turn is
    left out of the sketch and used as the Hutchinson probe of the complement, and the
    ``k`` estimates are averaged. Unbiased; exact when ``rank A < m/2`` or ``m/2 ≥ D``
    (then ``Q`` spans everything). Needs ``m ≥ 4``.
    """

    num_matvecs: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        _check_budget("XTrace/XDiag", self.num_matvecs, 4)


#: XDiag is XTrace's exchangeable construction applied to the diagonal.
XDiag = XTrace


@dataclass(frozen=True)
class SLQ(Algorithm):
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
