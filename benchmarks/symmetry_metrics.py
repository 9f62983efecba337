r"""Accuracy metrics of a curvature proxy ``B`` against a dense reference block ``C``.

All three compare dense symmetric matrices (float64 tensors) of one layer's block:

* :func:`relative_frobenius_error`: ``‖B − C‖_F / ‖C‖_F``.
* :func:`scale_optimal_error`: ``min_c ‖cB − C‖_F / ‖C‖_F``. The minimiser is
  ``c* = ⟨B, C⟩ / ‖B‖²`` (``⟨X, Y⟩ = tr(XᵀY)``), and the minimum has the closed form
  ``√(1 − cos²(B, C))`` with ``cos(B, C) = ⟨B, C⟩ / (‖B‖ ‖C‖)``: the sine of the angle
  between ``B`` and ``C`` as vectors, blind to ``B``'s scale. ``B = 0`` gives 1.
* :func:`subspace_overlap`: ``tr(P_B P_C) / k`` with ``P`` the projector onto the top-``k``
  eigenvectors (largest eigenvalues), i.e. ``‖U_Bᵀ U_C‖_F² / k`` for orthonormal ``U``. An
  eigenvalue repeated across the ``k``-th position (a Kronecker factor's identity, a
  multiple of ``I``) leaves ``U`` undefined; its eigenspace ``E`` (dimension ``d``, ``j`` of
  its vectors needed to reach ``k``) then enters as ``(j/d) P_E``, the average of the
  projectors onto every ``j``-dimensional subspace of ``E``. So a multiple of the identity
  scores the chance level ``k / D``, and the value is 1 for the same subspace and 0 for
  orthogonal ones.
"""

from __future__ import annotations

import torch

#: Eigenvalues closer than this times the largest magnitude count as one repeated value.
TIE_TOLERANCE = 1e-8


def _check_pair(B: torch.Tensor, C: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``B`` and ``C`` are square matrices of one shape."""
    if B.ndim != 2 or B.shape[0] != B.shape[1] or B.shape != C.shape:
        raise ValueError(
            f"B and C must be square matrices of one shape, got {tuple(B.shape)} and "
            f"{tuple(C.shape)}."
        )


def relative_frobenius_error(B: torch.Tensor, C: torch.Tensor) -> float:
    """Return ``‖B − C‖_F / ‖C‖_F``."""
    _check_pair(B, C)
    return float(torch.linalg.matrix_norm(B - C) / torch.linalg.matrix_norm(C))


def optimal_scale(B: torch.Tensor, C: torch.Tensor) -> float:
    """Return ``c* = argmin_c ‖cB − C‖_F = ⟨B, C⟩ / ‖B‖²`` (0 for ``B = 0``)."""
    _check_pair(B, C)
    norm_squared = float((B * B).sum())
    return float((B * C).sum()) / norm_squared if norm_squared > 0 else 0.0


def scale_optimal_error(B: torch.Tensor, C: torch.Tensor) -> float:
    """Return ``min_c ‖cB − C‖_F / ‖C‖_F = ‖c* B − C‖_F / ‖C‖_F``."""
    return relative_frobenius_error(optimal_scale(B, C) * B, C)


def top_k_projector(M: torch.Tensor, k: int) -> torch.Tensor:
    """Return the projector onto ``M``'s top-``k`` eigenspace, ties at the edge averaged.

    Eigenvalues within ``TIE_TOLERANCE · max|λ|`` of the ``k``-th largest form its
    eigenspace ``E``; those of ``E`` above position ``k`` give the weight ``j / dim E``.
    """
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square matrix, got shape {tuple(M.shape)}.")
    if not 1 <= k <= M.shape[0]:
        raise ValueError(f"k must be in [1, {M.shape[0]}], got {k}.")
    values, vectors = torch.linalg.eigh((M + M.T) / 2)
    values, vectors = values.flip(0), vectors.flip(1)
    tolerance = TIE_TOLERANCE * max(float(values.abs().max()), torch.finfo(M.dtype).tiny)
    edge = values[k - 1]
    tied = (values - edge).abs() <= tolerance
    above = int((values > edge + tolerance).sum())
    weights = (values > edge + tolerance).to(M.dtype)
    weights[tied] = (k - above) / int(tied.sum())
    return (vectors * weights) @ vectors.T


def subspace_overlap(B: torch.Tensor, C: torch.Tensor, k: int) -> float:
    """Return ``tr(P_B P_C) / k`` of the top-``k`` projectors (``‖U_Bᵀ U_C‖_F² / k``)."""
    _check_pair(B, C)
    return float((top_k_projector(B, k) * top_k_projector(C, k)).sum()) / k


__all__ = [
    "optimal_scale",
    "relative_frobenius_error",
    "scale_optimal_error",
    "subspace_overlap",
    "top_k_projector",
]
