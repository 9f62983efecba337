"""Blocks with a closed-form spectrum: ``G ⊗ A``, its eigen-form, and a diagonal.

:class:`KroneckerBlock`, :class:`EigenKronecker` and :class:`DiagonalBlock`, the blocks of a
:class:`~cola_curvature.operators.kronecker.KroneckerFactored`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cola import backends
from cola.ops import Kronecker, LinearOperator

from cola_curvature.operators._operator_init import init_operator
from cola_curvature.operators.kronecker_algebra import (
    _factor_diagonal,
    _factor_eigh,
    _factor_operator,
    _from_eigh,
    _left,
    _right,
    _shifted_factor,
    _transposed,
)
from cola_curvature.types import Array


class KroneckerBlock(Kronecker):
    """A block ``G ⊗ A`` with symmetric factors (row-major ``vec`` of an ``out × in`` matrix).

    ``G`` (``out × out``) acts on the rows of a weight matrix and ``A`` (``in × in``) on its
    columns: ``(G ⊗ A) vec(W) = vec(G W A)``. A factor is a dense matrix or, given as a 1-d
    array ``d``, the diagonal matrix ``diag(d)`` (an embedding's token counts: never formed
    densely; it is its own eigendecomposition, with the identity as eigenbasis). The dense
    factors' eigendecompositions are computed on first use, in float64, and cached (cost
    ``O(out³ + in³)``); a block derived from another (:meth:`scaled`,
    :meth:`heuristically_damped`, :meth:`inverse`) derives them from its parent's instead,
    through ``factor_eigh``, a function returning them.

    Construction stores the two arrays and nothing else (no CoLA dispatch, ``O(1)``); the
    factors as CoLA operators, :attr:`Ms`, are made when a CoLA rule asks for them.
    """

    def __init__(
        self,
        output_factor: Array,
        input_factor: Array,
        factor_eigh: Callable[[], tuple[tuple[Array, Array], tuple[Array, Array]]] | None = None,
    ) -> None:
        self.output_factor = output_factor
        self.input_factor = input_factor
        self._factor_eigh_source = factor_eigh
        self._cache: dict[str, Any] = {}
        size = output_factor.shape[0] * input_factor.shape[0]
        xnp = backends.get_library_fns(output_factor.dtype)
        dtype = xnp.promote_types(output_factor.dtype, input_factor.dtype)
        # CoLA's annotations of a Kronecker product: those its factors share, and a Dense
        # or Diagonal factor has none.
        init_operator(self, dtype, (size, size), set())

    @property
    def Ms(self) -> tuple[LinearOperator, LinearOperator]:  # noqa: N802  (CoLA's name)
        """Return ``(G, A)`` as CoLA operators (``Dense``, or ``Diagonal`` for a 1-d factor)."""
        return _factor_operator(self.output_factor), _factor_operator(self.input_factor)

    def factor_eigh(self) -> tuple[tuple[Array, Array | None], tuple[Array, Array | None]]:
        """Return ``((λ_G, Q_G), (λ_A, Q_A))``, the factors' eigendecompositions (cached).

        ``Q`` is ``None`` for a diagonal factor: its eigenbasis is the identity.
        """
        if "factor_eigh" not in self._cache:
            source = self._factor_eigh_source
            self._cache["factor_eigh"] = (
                source()
                if source is not None
                else (_factor_eigh(self.output_factor), _factor_eigh(self.input_factor))
            )
        return self._cache["factor_eigh"]

    def eigen(self) -> EigenKronecker:
        """Return ``(Q_G ⊗ Q_A) diag(λ_G ⊗ λ_A) (Q_G ⊗ Q_A)ᵀ``, the same matrix in eigen-form."""
        if "eigen" not in self._cache:
            xnp = self.xnp
            (values_out, q_out), (values_in, q_in) = self.factor_eigh()
            eigenvalues = values_out[:, None] * values_in[None, :]
            self._cache["eigen"] = EigenKronecker(q_out, q_in, xnp.cast(eigenvalues, self.dtype))
        return self._cache["eigen"]

    def spectrum(self) -> Array:
        """Return the eigenvalues ``λ_G,i λ_A,j``, flat in row-major ``(i, j)`` order."""
        return self.eigen().spectrum()

    def map_spectrum(self, fn: Callable[[Array], Array]) -> EigenKronecker:
        """Return ``f(G ⊗ A) = (Q_G ⊗ Q_A) diag(f(λ_G ⊗ λ_A)) (Q_G ⊗ Q_A)ᵀ``."""
        return self.eigen().map_spectrum(fn)

    def eigenvector(self, index: int) -> Array:
        """Return the eigenvector of flat eigenvalue ``index``: ``q_{G,i} ⊗ q_{A,j}``."""
        return self.eigen().eigenvector(index)

    def diagonal(self) -> Array:
        """Return ``diag(G) ⊗ diag(A)``."""
        return self.xnp.kron(
            _factor_diagonal(self.output_factor), _factor_diagonal(self.input_factor)
        )

    def trace(self) -> Array:
        """Return ``tr(G) · tr(A)``."""
        return (
            _factor_diagonal(self.output_factor).sum() * _factor_diagonal(self.input_factor).sum()
        )

    def scaled(self, factor: Array) -> KroneckerBlock:
        """Return ``(c G) ⊗ A``, sharing ``A`` and the eigenbasis (computed once, here).

        The eigenvalues are scaled, not recomputed: a posterior ``H / σ² + δ I`` evaluated
        for many ``(σ, δ)`` decomposes ``H``'s factors once.
        """

        def factor_eigh() -> tuple[tuple[Array, Array], tuple[Array, Array]]:
            (values_out, q_out), eigh_in = self.factor_eigh()
            return (factor * values_out, q_out), eigh_in

        block = KroneckerBlock(factor * self.output_factor, self.input_factor, factor_eigh)
        block._cache["eigen"] = self.eigen().scaled(factor)
        return block

    def inverse(self) -> KroneckerBlock:
        """Return ``(G ⊗ A)⁻¹ = G⁻¹ ⊗ A⁻¹`` with ``G⁻¹ = Q_G Λ_G⁻¹ Q_Gᵀ`` (likewise ``A⁻¹``).

        The factor inverses come from the cached eigendecompositions (``O(out³ + in³)``
        once); a product then costs two matrix products per column, not the eigen-form's four.
        """
        (values_out, q_out), (values_in, q_in) = self.factor_eigh()
        return KroneckerBlock(
            _from_eigh(1 / values_out, q_out),
            _from_eigh(1 / values_in, q_in),
            lambda: ((1 / values_out, q_out), (1 / values_in, q_in)),
        )

    def _matmat(self, X: Array) -> Array:
        """Return ``vec(G W A)`` for every column ``vec(W)`` of ``X``: two matrix products."""
        out, inp = self.output_factor.shape[0], self.input_factor.shape[0]
        columns = X.T.reshape(X.shape[1], out, inp)
        result = _left(self.output_factor, _right(columns, self.input_factor))
        return result.reshape(X.shape[1], out * inp).T

    def heuristically_damped(self, damping: float) -> KroneckerBlock:
        """Return ``(G + √λ/π I) ⊗ (A + π√λ I)``, ``π = √((tr A / dim A) / (tr G / dim G))``.

        The π-heuristic of Martens & Grosse (2015) splits ``λ`` between the factors so both
        are damped in proportion to their average eigenvalue. The damped factors keep the
        eigenvectors; their eigenvalues are shifted, so no new eigendecomposition is needed.
        """
        out, inp = self.output_factor.shape[0], self.input_factor.shape[0]
        mean_out = _factor_diagonal(self.output_factor).sum() / out
        mean_in = _factor_diagonal(self.input_factor).sum() / inp
        pi = (mean_in / mean_out) ** 0.5
        root = damping**0.5
        shift_out, shift_in = root / pi, root * pi

        def factor_eigh() -> tuple[tuple[Array, Array], tuple[Array, Array]]:
            (values_out, q_out), (values_in, q_in) = self.factor_eigh()
            return (values_out + shift_out, q_out), (values_in + shift_in, q_in)

        return KroneckerBlock(
            _shifted_factor(self.output_factor, shift_out),
            _shifted_factor(self.input_factor, shift_in),
            factor_eigh,
        )


class EigenKronecker(LinearOperator):
    """A block ``(Q_G ⊗ Q_A) diag(vec S) (Q_G ⊗ Q_A)ᵀ`` with orthogonal ``Q_G``, ``Q_A``.

    ``S`` has shape ``(out, in)``: entry ``(i, j)`` is the eigenvalue of eigenvector
    ``q_{G,i} ⊗ q_{A,j}``. This is the form of an eigen-decomposed Kronecker block, of an
    EKFAC block (George et al., 2018), and of any spectral function of either. A product
    costs four matrix products, ``O(out · in · (out + in))`` per column. A basis given as
    ``None`` is the identity (the eigenbasis of a diagonal factor), never formed.
    """

    def __init__(self, q_out: Array | None, q_in: Array | None, eigenvalues: Array) -> None:
        self.q_out = q_out
        self.q_in = q_in
        self.eigenvalues = eigenvalues
        size = eigenvalues.shape[0] * eigenvalues.shape[1]
        init_operator(self, eigenvalues.dtype, (size, size), set())

    def map_spectrum(self, fn: Callable[[Array], Array]) -> EigenKronecker:
        """Return ``(Q_G ⊗ Q_A) diag(fn(S)) (Q_G ⊗ Q_A)ᵀ``."""
        return EigenKronecker(self.q_out, self.q_in, fn(self.eigenvalues))

    def eigen(self) -> EigenKronecker:
        """Return itself: the block is already in eigen-form."""
        return self

    def scaled(self, factor: Array) -> EigenKronecker:
        """Return the block times ``c``: same eigenbasis, eigenvalues ``c S``."""
        return EigenKronecker(self.q_out, self.q_in, factor * self.eigenvalues)

    def spectrum(self) -> Array:
        """Return ``vec S``, the eigenvalues in row-major ``(i, j)`` order."""
        return self.eigenvalues.reshape(-1)

    def _matmat(self, X: Array) -> Array:
        """Return the block times ``X`` through ``Q_G (S ⊙ (Q_Gᵀ X Q_A)) Q_Aᵀ`` per column.

        A block with a ``1 × 1`` factor (a dense block, a bias) is one matrix product. An
        identity basis (``None``, from a diagonal factor) costs nothing.
        """
        out, inp = self.eigenvalues.shape
        if inp == 1:
            scale = 1 if self.q_in is None else self.q_in[0, 0] ** 2
            rotated = _left(_transposed(self.q_out), X)
            return _left(self.q_out, (scale * self.eigenvalues) * rotated)
        if out == 1:
            scale = 1 if self.q_out is None else self.q_out[0, 0] ** 2
            rotated = _left(_transposed(self.q_in), X)
            return _left(self.q_in, (scale * self.eigenvalues.T) * rotated)
        columns = X.T.reshape(X.shape[1], out, inp)
        rotated = _left(_transposed(self.q_out), _right(columns, self.q_in))
        result = _left(self.q_out, _right(self.eigenvalues * rotated, _transposed(self.q_in)))
        return result.reshape(X.shape[1], out * inp).T

    def diagonal(self) -> Array:
        """Return the diagonal, ``Σ_{ij} S_ij (Q_G)_{ri}² (Q_A)_{cj}²`` at entry ``(r, c)``."""
        squares_out = None if self.q_out is None else self.q_out**2
        squares_in = None if self.q_in is None else self.q_in.T**2
        return _left(squares_out, _right(self.eigenvalues, squares_in)).reshape(-1)

    def trace(self) -> Array:
        """Return ``Σ S``."""
        return self.eigenvalues.sum()

    def eigenvector(self, index: int) -> Array:
        """Return ``q_{G,i} ⊗ q_{A,j}`` for the flat (row-major) eigenvalue ``index``."""
        out, inp = self.eigenvalues.shape
        i, j = divmod(index, inp)
        return self.xnp.kron(
            self._basis_vector(self.q_out, i, out), self._basis_vector(self.q_in, j, inp)
        )

    def _basis_vector(self, basis: Array | None, index: int, size: int) -> Array:
        """Return column ``index`` of a basis; the unit vector ``e_index`` for the identity."""
        if basis is not None:
            return basis[:, index]
        return self.xnp.canonical(loc=index, shape=(size,), dtype=self.dtype, device=self.device)


class DiagonalBlock(LinearOperator):
    """A diagonal block ``diag(d)``: its own eigen-decomposition (eigenvectors ``e_i``)."""

    def __init__(self, values: Array) -> None:
        self.values = values
        init_operator(self, values.dtype, (values.shape[0], values.shape[0]), set())

    def _matmat(self, X: Array) -> Array:
        """Return ``d ⊙ X`` row-wise."""
        return self.values[:, None] * X

    def spectrum(self) -> Array:
        """Return ``d``."""
        return self.values

    def map_spectrum(self, fn: Callable[[Array], Array]) -> DiagonalBlock:
        """Return ``diag(f(d))``."""
        return DiagonalBlock(fn(self.values))

    def scaled(self, factor: Array) -> DiagonalBlock:
        """Return ``diag(c d)``."""
        return DiagonalBlock(factor * self.values)

    def eigenvector(self, index: int) -> Array:
        """Return the unit vector ``e_index``."""
        xnp = self.xnp
        return xnp.canonical(
            loc=index, shape=self.values.shape, dtype=self.dtype, device=self.device
        )

    def eigen(self) -> DiagonalBlock:
        """Return itself: a diagonal is its own eigen-form."""
        return self

    def heuristically_damped(self, damping: float) -> DiagonalBlock:
        """Return ``diag(d + λ)``: a diagonal has no factors to split ``λ`` between."""
        return DiagonalBlock(self.values + damping)

    def diagonal(self) -> Array:
        """Return ``d``."""
        return self.values

    def trace(self) -> Array:
        """Return ``Σ d``."""
        return self.values.sum()
