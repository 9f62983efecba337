"""When an eigenvalue of an exactly decomposed operator counts as zero."""

from __future__ import annotations

from typing import Any

from cola_curvature.types import Array


def zero_cutoff(eigenvalues: Array, xnp: Any) -> Array:
    """Return ``10 · ε · max|λ|``: eigenvalues no larger in magnitude count as zeros.

    Eigenvalues that small are rounding noise around an exact zero (an undamped KFAC of a
    rank-deficient factor gives ``±1e-17``): their sign and magnitude carry no information,
    so the rules treat them as zeros (singular for ``inv``, ``det = 0`` for ``slogdet``).
    A backward-stable ``eigh`` of a factor errs by a small multiple of ``ε ‖G‖``, so an
    eigenvalue ``λ_G λ_A`` of a block ``G ⊗ A`` errs by about ``ε max|λ|``, independent of
    ``D`` (a ``D``-dependent cutoff such as NumPy's ``matrix_rank`` tolerance would call a
    damped float32 KFAC of millions of parameters singular).
    """
    return 10 * xnp.finfo(eigenvalues.dtype).eps * xnp.abs(eigenvalues).max()
