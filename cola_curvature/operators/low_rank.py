r"""``diag(d) + U M Uᵀ``: a diagonal plus a rank-``k`` term, closed under the rules it needs.

With ``K = Uᵀ diag(d)⁻¹ U`` (``k × k``):

* inverse (Woodbury, in the form that needs no ``M⁻¹``):
  ``(diag(d) + U M Uᵀ)⁻¹ = diag(1/d) − (U/d) M (I + K M)⁻¹ (U/d)ᵀ`` — again a diagonal
  plus a rank-``k`` term, with ``M (I + K M)⁻¹ = (I + M K)⁻¹ M`` symmetric;
* determinant (Sylvester): ``det(diag(d) + U M Uᵀ) = Π d_i · det(I_k + M K)``;
* a factor ``L`` with ``L Lᵀ = (diag(d) + U M Uᵀ)⁻¹`` (for sampling): with
  ``W = diag(d)^{-1/2} U = Q R`` (thin QR) and ``R M Rᵀ = V Λ Vᵀ``,
  ``diag(d) + U M Uᵀ = diag(d)^{1/2} (I + Q V Λ Vᵀ Qᵀ) diag(d)^{1/2}``, so
  ``L = diag(d)^{-1/2} (I + Q V ((1 + Λ)^{-1/2} − 1) Vᵀ Qᵀ)``;
* a spectral function of a constant diagonal ``d = c 1``: with ``W = U / √c`` the same
  ``B = Q V`` gives ``c I + U M Uᵀ = c (I + B Λ Bᵀ)``, so
  ``f(c I + U M Uᵀ) = f(c) I + B (f(c (1 + Λ)) − f(c)) Bᵀ`` — for ``f(x) = 1/√x`` the
  factor ``L`` above, now symmetric: ``(c I + U M Uᵀ)^{-1/2}`` itself. A diagonal that is
  not constant has no such closed form (``(diag(d) + U M Uᵀ)^{-1/2}`` is in general not
  a diagonal plus a rank-``k`` term), and ``L`` is then not symmetric;
* ``c (diag(d) + U M Uᵀ) + λ I = diag(c d + λ) + U (c M) Uᵀ``, trace
  ``Σ d + tr(M UᵀU)``, diagonal ``d + rowsum((U M) ⊙ U)``.

Every operation costs ``O(D k² + k³)``; nothing of size ``D × D`` is formed.
"""

from __future__ import annotations

from collections.abc import Callable

from cola.ops import Diagonal, LinearOperator

from cola_curvature._tracing import is_abstract, known_nonnegative
from cola_curvature.types import Array


class DiagonalPlusLowRank(LinearOperator):
    """``diag(d) + U M Uᵀ``: ``d > 0`` (``D``), ``U`` (``D × k``), symmetric ``M`` (``k × k``).

    The low-rank Laplace curvature ``U diag(s) Uᵀ + diag(d)`` (top-``k`` eigenpairs of the
    GGN plus the rest of its diagonal) and its posterior precision and inverse are of this
    type; see the module docstring for the formulas.
    """

    def __init__(self, diagonal: Array, U: Array, M: Array, annotations: set | None = None) -> None:
        self.diagonal_part = diagonal
        self.U = U
        self.M = M
        super().__init__(diagonal.dtype, (diagonal.shape[0], diagonal.shape[0]))
        self.annotations = self.annotations | (annotations if annotations is not None else set())

    def _matmat(self, X: Array) -> Array:
        return self.diagonal_part[:, None] * X + self.U @ (self.M @ (self.U.T @ X))

    def _capacitance(self) -> Array:
        """Return ``K = Uᵀ diag(d)⁻¹ U``."""
        return self.U.T @ (self.U / self.diagonal_part[:, None])

    def _eye(self) -> Array:
        size = self.M.shape[0]
        return self.xnp.eye(size, size, dtype=self.dtype, device=self.device)

    def scaled(self, factor: Array) -> DiagonalPlusLowRank:
        """Return ``c (diag(d) + U M Uᵀ)``."""
        keep = set(self.annotations) if known_nonnegative(factor) else set()
        return DiagonalPlusLowRank(factor * self.diagonal_part, self.U, factor * self.M, keep)

    def damped(self, damping: Array) -> DiagonalPlusLowRank:
        """Return ``diag(d + λ) + U M Uᵀ``."""
        keep = set(self.annotations) if known_nonnegative(damping) else set()
        return DiagonalPlusLowRank(self.diagonal_part + damping, self.U, self.M, keep)

    def inverse(self) -> DiagonalPlusLowRank:
        """Return ``diag(1/d) − (U/d) M (I + K M)⁻¹ (U/d)ᵀ`` (Woodbury)."""
        xnp = self.xnp
        middle = xnp.solve(self._eye() + self.M @ self._capacitance(), self.M)
        middle = (middle + middle.T) / 2
        scaled_U = self.U / self.diagonal_part[:, None]
        return DiagonalPlusLowRank(1 / self.diagonal_part, scaled_U, -middle, set(self.annotations))

    def slogdet(self) -> tuple[Array, Array]:
        """Return ``(sign, log|det|)`` from ``Π d_i · det(I + M K)`` (Sylvester)."""
        xnp = self.xnp
        sign, log_small = xnp.slogdet(self._eye() + self.M @ self._capacitance())
        diagonal_sign = xnp.prod(xnp.sign(self.diagonal_part))
        return sign * diagonal_sign, xnp.log(xnp.abs(self.diagonal_part)).sum() + log_small

    def _whitened_eigh(self) -> tuple[Array, Array, Array]:
        """Return ``√d``, orthonormal ``B = Q V`` (``D × k``) and ``Λ`` (module docstring).

        ``diag(d) + U M Uᵀ = diag(√d) (I + B diag(Λ) Bᵀ) diag(√d)``.
        """
        xnp = self.xnp
        root = xnp.sqrt(self.diagonal_part)
        Q, R = xnp.qr(self.U / root[:, None], full_matrices=False)
        values, V = xnp.eigh(R @ self.M @ R.T)
        return root, Q @ V, values

    def inverse_factor(self) -> LinearOperator:
        """Return ``L = diag(d)^{-1/2} (I + B S Bᵀ)`` with ``L Lᵀ`` the inverse (needs PSD).

        ``B = Q V`` has orthonormal columns and ``S = (1 + Λ)^{-1/2} − 1`` (module docstring).
        """
        root, B, values = self._whitened_eigh()
        shrink = 1 / self.xnp.sqrt(1 + values) - 1
        ones = self.xnp.ones_like(self.diagonal_part)
        return Diagonal(1 / root) @ DiagonalPlusLowRank(ones, B, self.xnp.diag(shrink))

    def has_constant_diagonal(self) -> bool:
        """Return whether ``d = c 1`` (``False`` when ``d`` is traced and has no values)."""
        d = self.diagonal_part
        return not is_abstract(d) and bool((d == d[0]).all())

    def map_spectrum(self, fn: Callable[[Array], Array]) -> DiagonalPlusLowRank:
        """Return ``f(c I + U M Uᵀ) = f(c) I + B (f(c (1 + Λ)) − f(c)) Bᵀ``, exactly.

        Only for a constant diagonal ``d = c 1`` (:meth:`has_constant_diagonal`); ``f`` acts
        elementwise on arrays. ``O(D k² + k³)``.

        Raises:
            ValueError: when the diagonal is not constant.
        """
        if not self.has_constant_diagonal():
            raise ValueError(
                "map_spectrum needs a constant diagonal d = c·1: f(diag(d) + U M Uᵀ) is in "
                "general not a diagonal plus a rank-k term; use cola.linalg functions, which "
                "fall back to Lanczos."
            )
        _, B, values = self._whitened_eigh()
        c = self.diagonal_part[:1]
        at_c = fn(c)
        shift = self.xnp.diag(fn(c * (1 + values)) - at_c)
        return DiagonalPlusLowRank(at_c * self.xnp.ones_like(self.diagonal_part), B, shift)

    def trace(self) -> Array:
        """Return ``Σ d + tr(M UᵀU)``."""
        return self.diagonal_part.sum() + (self.M * (self.U.T @ self.U)).sum()

    def diagonal(self) -> Array:
        """Return ``d + rowsum((U M) ⊙ U)``."""
        return self.diagonal_part + ((self.U @ self.M) * self.U).sum(1)
