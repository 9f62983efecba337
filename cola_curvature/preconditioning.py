"""Preconditioned steps ``(C + εI)^p g`` through a Kronecker-factored curvature's eigenbases."""

from __future__ import annotations

from typing import Any

from cola_curvature.operators.kronecker import KroneckerFactored


def preconditioned_step(
    curvature: KroneckerFactored, gradient: Any, damping: float, power: float = -0.5
) -> Any:
    """Return ``(C + ε I)^p g``, exactly, from each block's eigen-decomposition.

    ``p = −1/2`` with a symmetry-averaged ``C`` gives the Muon- and Shampoo-like updates
    (for ``I ⊗ GᵀG/m`` and ``ε → 0``, ``(C + εI)^{-1/2} vec(G) → √m vec(U Vᵀ)``, the polar
    factor of ``G = U Σ Vᵀ``); ``p = −1`` a damped Newton-like step with KFAC. The
    curvature is PSD (KFAC, EKFAC, symmetry averages): eigenvalues a float32
    eigendecomposition returns below zero are rounding errors and count as 0, so the
    step is ``Q (max(λ, 0) + ε)^p Qᵀ g``.
    ``gradient``: ``(D,)``, ``(D, k)`` or, for operators built from a model, shaped like
    ``params`` (answered in the same format).
    """
    if not isinstance(curvature, KroneckerFactored):
        raise TypeError(
            f"curvature must be Kronecker-factored (KFAC, EKFAC, SymmetryCurvature, ...), got "
            f"{type(curvature).__name__}; for matrix-free operators use cola.linalg.inv."
        )
    if not damping > 0 and power < 0:
        raise ValueError(f"a negative power needs damping > 0, got {damping!r}.")
    # the curvature is PSD: eigenvalues below 0 are rounding (a float32 eigh of GᵀG/m gives
    # -2e-5 next to 110), and a negative base to the power -1/2 would be NaN
    operator = curvature.map_spectrum(lambda s: ((s + abs(s)) / 2 + damping) ** power)
    return operator @ gradient
