r"""Closed forms of a gradient outer product averaged over a weight-space symmetry group.

For a weight matrix ``W ∈ R^{m×n}`` with gradient ``G`` and row-major ``g = vec(G)``, a group
acting linearly on ``W`` by ``vec(h·W) = ρ(h) vec(W)`` gives the curvature proxy

``C = E_h[ρ(h) g gᵀ ρ(h)ᵀ]``,

the projection of ``g gᵀ`` onto the matrices commuting with the action. Write ``G_i`` for
row ``i`` of ``G`` (a column vector of length ``n``), so ``g gᵀ`` has ``n × n`` blocks
``G_i G_kᵀ``.

* Orthogonal group on the rows, ``W → QW`` (``ρ = Q ⊗ I_n``): block ``(a, b)`` of ``C`` is
  ``Σ_{ik} E[Q_ai Q_bk] G_i G_kᵀ``, and ``E[Q_ai Q_bk] = δ_ab δ_ik / m`` for Haar ``Q``, so
  ``C = I_m ⊗ GᵀG / m``.
* Orthogonal group on the columns, ``W → WQ`` (``ρ = I_m ⊗ Qᵀ``): by the same identity on
  the columns, ``C = GGᵀ / n ⊗ I_n``.
* Both sides, ``W → Q_1 W Q_2``: the two averages composed, ``C = ‖G‖² / (mn) · I``.
* Permutations of the rows (hidden units), ``W → ΠW``: block ``(a, a)`` averages
  ``G_i G_iᵀ`` over ``i``, block ``(a ≠ b)`` averages ``G_i G_kᵀ`` over ``i ≠ k``; with
  ``S = GᵀG`` and ``T = (Gᵀ1)(Gᵀ1)ᵀ``, ``Σ_{i≠k} G_i G_kᵀ = T − S``, so
  ``C = I_m ⊗ A + 11ᵀ ⊗ B`` with ``B = (T − S) / (m(m−1))``, ``A = S/m − B``
  (``B = 0`` for ``m = 1``).

Every average is linear in ``g gᵀ``, so a weighted sum of outer products (several
batches, an exponential moving average) averages to the same weighted sum of the
statistics ``GᵀG``, ``GGᵀ``, ``‖G‖²`` and ``T``.

Spectral structure of the permutation average: with ``u = 1/√m`` and ``11ᵀ = m uuᵀ``,
``C = uuᵀ ⊗ (A + mB) + (I − uuᵀ) ⊗ A``. So ``C`` has the eigenvalues of ``A + mB = T/m``
(eigenvectors ``u ⊗ v``) and those of ``A``, each ``m − 1`` times (eigenvectors ``h ⊗ v``,
``h ⊥ 1``), and for every spectral function ``f(C) = uuᵀ ⊗ f(A + mB) + (I − uuᵀ) ⊗ f(A)``
— again of the form ``I ⊗ A' + 11ᵀ ⊗ B'``. In particular
``logdet(C + λI) = logdet(A + mB + λI) + (m − 1) logdet(A + λI)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from cola.backends import get_library_fns
from cola.ops import LinearOperator

from cola_curvature.operators.kronecker_algebra import symmetric_eigh
from cola_curvature.operators.kronecker_blocks import KroneckerBlock
from cola_curvature.options import SymmetryGroup, parse_option
from cola_curvature.types import Array


class PermutationAveragedBlock(LinearOperator):
    """``C = I_m ⊗ A + 11ᵀ ⊗ B`` kept in eigen-form: ``uuᵀ ⊗ M₁ + (I − uuᵀ) ⊗ M₀``.

    ``M₁ = A + mB = Q₁ diag(s₁) Q₁ᵀ`` acts on the row-mean of ``W``, ``M₀ = A =
    Q₀ diag(s₀) Q₀ᵀ`` on its deviation from the mean (``u = 1/√m``). Flat eigenvalue order:
    the ``n`` values ``s₁`` first (eigenvectors ``u ⊗ q₁``), then ``s₀`` once for each of
    the ``m − 1`` Helmert vectors ``h_j ⊥ 1``. A product costs ``O(m n²)`` per column;
    the block never forms an ``mn × mn`` matrix.

    Args:
        num_rows: ``m``.
        q_mean, values_mean: ``Q₁``, ``s₁``.
        q_rest, values_rest: ``Q₀``, ``s₀``.

    """

    def __init__(
        self,
        num_rows: int,
        q_mean: Array,
        values_mean: Array,
        q_rest: Array,
        values_rest: Array,
    ) -> None:
        self.num_rows = num_rows
        self.q_mean, self.values_mean = q_mean, values_mean
        self.q_rest, self.values_rest = q_rest, values_rest
        size = num_rows * q_mean.shape[0]
        super().__init__(values_mean.dtype, (size, size))

    @classmethod
    def from_factors(cls, num_rows: int, A: Array, B: Array) -> PermutationAveragedBlock:
        """Return ``I_m ⊗ A + 11ᵀ ⊗ B`` for symmetric ``A``, ``B`` (two ``n × n`` eigh)."""
        values_mean, q_mean = symmetric_eigh(A + num_rows * B)
        values_rest, q_rest = symmetric_eigh(A)
        return cls(num_rows, q_mean, values_mean, q_rest, values_rest)

    def _matrix(self, q: Array, values: Array) -> Array:
        return (q * values) @ q.T

    def factors(self) -> tuple[Array, Array]:
        """Return ``(A, B)`` with ``C = I_m ⊗ A + 11ᵀ ⊗ B``."""
        rest = self._matrix(self.q_rest, self.values_rest)
        mean = self._matrix(self.q_mean, self.values_mean)
        return rest, (mean - rest) / self.num_rows

    def eigen(self) -> PermutationAveragedBlock:
        """Return itself: the block is kept in eigen-form."""
        return self

    def map_spectrum(self, fn: Callable[[Array], Array]) -> PermutationAveragedBlock:
        """Return ``f(C) = uuᵀ ⊗ f(M₁) + (I − uuᵀ) ⊗ f(M₀)``."""
        return PermutationAveragedBlock(
            self.num_rows, self.q_mean, fn(self.values_mean), self.q_rest, fn(self.values_rest)
        )

    def scaled(self, factor: Array) -> PermutationAveragedBlock:
        """Return ``c C``."""
        return self.map_spectrum(lambda s: factor * s)

    def spectrum(self) -> Array:
        """Return ``s₁`` followed by ``s₀`` repeated ``m − 1`` times."""
        xnp = self.xnp
        return xnp.concat([self.values_mean] + [self.values_rest] * (self.num_rows - 1))

    def eigenvector(self, index: int) -> Array:
        """Return ``u ⊗ q₁,i`` for ``index < n``, else ``h_j ⊗ q₀,i`` (Helmert ``h_j``)."""
        xnp = self.xnp
        width = self.q_mean.shape[0]
        device = xnp.get_device(self.q_mean)
        if index < width:
            row = xnp.ones((self.num_rows,), dtype=self.dtype, device=device)
            return xnp.kron(row / math.sqrt(self.num_rows), self.q_mean[:, index])
        j, i = divmod(index - width, width)
        j += 1  # Helmert vector h_j = (1, …, 1, −j, 0, …) / √(j (j + 1)), j = 1 … m − 1
        entries = [1.0] * j + [-float(j)] + [0.0] * (self.num_rows - j - 1)
        row = xnp.array(entries, dtype=self.dtype, device=device) / math.sqrt(j * (j + 1))
        return xnp.kron(row, self.q_rest[:, i])

    def diagonal(self) -> Array:
        """Return ``1_m ⊗ (diag M₁ / m + (1 − 1/m) diag M₀)``."""
        xnp = self.xnp
        mean = ((self.q_mean**2) * self.values_mean).sum(axis=1)
        rest = ((self.q_rest**2) * self.values_rest).sum(axis=1)
        m = self.num_rows
        row = mean / m + (1 - 1 / m) * rest
        return xnp.concat([row] * m)

    def trace(self) -> Array:
        """Return ``tr M₁ + (m − 1) tr M₀``."""
        return self.values_mean.sum() + (self.num_rows - 1) * self.values_rest.sum()

    def _matmat(self, X: Array) -> Array:
        """Return ``C X``: rows' mean through ``M₁``, deviations through ``M₀`` (per column)."""
        m, width = self.num_rows, self.q_mean.shape[0]
        columns = X.T.reshape(X.shape[1], m, width)
        averager = self.xnp.ones((1, m), dtype=self.dtype, device=self.xnp.get_device(X)) / m
        mean = averager @ columns
        mean_part = mean @ self._matrix(self.q_mean, self.values_mean)
        rest_part = (columns - mean) @ self._matrix(self.q_rest, self.values_rest)
        return (mean_part + rest_part).reshape(X.shape[1], m * width).T


def gradient_statistics(group: SymmetryGroup, G: Array) -> tuple[Array, ...]:
    """Return the statistics of the ``m × n`` gradient ``G`` that ``group``'s average needs.

    ``orthogonal-rows``: ``(GᵀG,)``; ``orthogonal-cols``: ``(GGᵀ,)``; ``orthogonal-both``:
    ``(‖G‖²,)``; ``permutation-rows``: ``(GᵀG, (Gᵀ1)(Gᵀ1)ᵀ)``. All are linear in ``g gᵀ``.
    """
    if group is SymmetryGroup.ORTHOGONAL_ROWS:
        return (G.T @ G,)
    if group is SymmetryGroup.ORTHOGONAL_COLS:
        return (G @ G.T,)
    if group is SymmetryGroup.ORTHOGONAL_BOTH:
        return ((G**2).sum(),)
    column_sums = G.sum(0)
    return (G.T @ G, column_sums[:, None] * column_sums[None, :])


def averaged_block(group: SymmetryGroup, statistics: tuple[Array, ...], shape: tuple[int, int]):
    """Return the group-averaged block of an ``m × n`` matrix from its (summed) statistics."""
    m, n = shape
    reference = statistics[0]
    xnp = get_library_fns(reference.dtype)
    device = xnp.get_device(reference)

    def eye(size: int) -> Array:  # the identity as a diagonal factor: never an O(size³) eigh
        return xnp.ones((size,), dtype=reference.dtype, device=device)

    if group is SymmetryGroup.ORTHOGONAL_ROWS:
        return KroneckerBlock(eye(m), statistics[0] / m)
    if group is SymmetryGroup.ORTHOGONAL_COLS:
        return KroneckerBlock(statistics[0] / n, eye(n))
    if group is SymmetryGroup.ORTHOGONAL_BOTH:
        return KroneckerBlock(eye(m), statistics[0] / (m * n) * eye(n))
    second_moment, sum_outer = statistics
    off_diagonal = (sum_outer - second_moment) / (m * (m - 1)) if m > 1 else 0 * second_moment
    return PermutationAveragedBlock.from_factors(m, second_moment / m - off_diagonal, off_diagonal)


def symmetry_block(G: Array, group: str | SymmetryGroup):
    """Return ``E_h[ρ(h) vec(G) vec(G)ᵀ ρ(h)ᵀ]`` for one ``m × n`` gradient matrix ``G``.

    A :class:`~cola_curvature.KroneckerBlock` for the orthogonal groups, a
    :class:`PermutationAveragedBlock` for ``"permutation-rows"``; row-major ``vec``.
    """
    group = parse_option(SymmetryGroup, group, "symmetry group")
    if G.ndim != 2:
        raise ValueError(f"G must be a matrix (m, n), got shape {tuple(G.shape)}.")
    return averaged_block(group, gradient_statistics(group, G), tuple(G.shape))


def shampoo_block(G: Array) -> KroneckerBlock:
    """Return the product of the two one-sided orthogonal averages, ``GGᵀ/n ⊗ GᵀG/m``.

    ``(GGᵀ/n ⊗ I)`` and ``(I ⊗ GᵀG/m)`` commute, so their product is the symmetric
    Kronecker product whose inverse fourth root is Shampoo's preconditioner (Gupta et al.
    2018): ``(L ⊗ R)^{-1/4} vec(G) = vec(L^{-1/4} G R^{-1/4})``, ``L = GGᵀ/n``,
    ``R = GᵀG/m``.
    """
    if G.ndim != 2:
        raise ValueError(f"G must be a matrix (m, n), got shape {tuple(G.shape)}.")
    m, n = G.shape
    return KroneckerBlock(G @ G.T / n, G.T @ G / m)
