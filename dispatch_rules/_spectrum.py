"""When an eigenvalue of an exactly decomposed operator counts as zero."""

from __future__ import annotations

from typing import Any

Array = Any


def zero_cutoff(eigenvalues: Array, dimension: int, xnp: Any) -> Array:
    """Return ``√D · ε · max|λ|``: eigenvalues no larger in magnitude count as zeros.

    Eigenvalues that small are rounding noise around an exact zero (an undamped KFAC of a
    rank-deficient factor gives ``±1e-17``): their sign and magnitude carry no information,
    so the rules treat them as zeros (singular for ``inv``, ``det = 0`` for ``slogdet``).
    An eigenvalue ``λ_G λ_A`` of a block ``G ⊗ A`` inherits the ``O(n ε max λ)`` error of
    the factors' eigendecompositions (``n`` their size, ``√D`` when both are ``√D``);
    NumPy's ``matrix_rank`` tolerance ``D ε max|λ|`` would call a float32 KFAC of a
    million parameters singular at eigenvalues of ``0.1 max|λ|``.
    """
    return dimension**0.5 * xnp.finfo(eigenvalues.dtype).eps * xnp.abs(eigenvalues).max()
