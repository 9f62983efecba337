"""Kronecker-factored structure: blocks ``G ⊗ A``, eigen-forms, a permuted block diagonal."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.linalg
from cola.annotations import PSD
from cola.ops import BlockDiag, Dense, Diagonal, Kronecker, LinearOperator

from cola_curvature._tracing import finite_or_traced, known_nonnegative
from cola_curvature.options import DampingMode, parse_option
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
    """

    def __init__(
        self,
        output_factor: Array,
        input_factor: Array,
        factor_eigh: Callable[[], tuple[tuple[Array, Array], tuple[Array, Array]]] | None = None,
    ) -> None:
        super().__init__(_factor_operator(output_factor), _factor_operator(input_factor))
        self.output_factor = output_factor
        self.input_factor = input_factor
        self._factor_eigh_source = factor_eigh
        self._cache: dict[str, Any] = {}

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


def _factor_operator(factor: Array) -> LinearOperator:
    """Return a factor as a CoLA operator: ``Diagonal`` for a 1-d array, else ``Dense``."""
    return Diagonal(factor) if factor.ndim == 1 else Dense(factor)


def _factor_diagonal(factor: Array) -> Array:
    """Return the diagonal of a factor (itself when the factor is stored as its diagonal)."""
    return factor if factor.ndim == 1 else Dense(factor).xnp.diag(factor)


def _factor_eigh(factor: Array) -> tuple[Array, Array | None]:
    """Return ``(λ, Q)`` of a factor; a diagonal ``d`` is its own: ``(d, None)`` (``Q = I``)."""
    return (factor, None) if factor.ndim == 1 else symmetric_eigh(factor)


def _from_eigh(values: Array, basis: Array | None) -> Array:
    """Return ``Q diag(λ) Qᵀ``, or the diagonal ``λ`` itself when ``Q`` is the identity."""
    return values if basis is None else (basis * values) @ basis.T


def _shifted_factor(factor: Array, shift: Array) -> Array:
    """Return ``F + c I`` in the factor's own storage (dense or diagonal)."""
    if factor.ndim == 1:
        return factor + shift
    xnp = Dense(factor).xnp
    eye = xnp.eye(
        factor.shape[0], factor.shape[0], dtype=factor.dtype, device=xnp.get_device(factor)
    )
    return factor + shift * eye


def _left(factor: Array | None, X: Array) -> Array:
    """Return ``F X`` for a dense or diagonal (1-d) ``F``; ``X`` for ``None`` (the identity)."""
    if factor is None:
        return X
    return factor[:, None] * X if factor.ndim == 1 else factor @ X


def _right(X: Array, factor: Array | None) -> Array:
    """Return ``X F`` for a dense or diagonal (1-d) ``F``; ``X`` for ``None`` (the identity)."""
    if factor is None:
        return X
    return X * factor if factor.ndim == 1 else X @ factor


def _transposed(basis: Array | None) -> Array | None:
    """Return ``Qᵀ`` (``None``, the identity, stays ``None``)."""
    return None if basis is None else basis.T


def symmetric_eigh(matrix: Array) -> tuple[Array, Array]:
    """Return ``(λ, Q)`` of a symmetric matrix, computed in float64 and cast back.

    JAX without ``jax_enable_x64`` has no float64: there the decomposition runs in float32
    (JAX truncates the cast; its warning about that is silenced here). When the backend's
    solver fails (LAPACK's divide and conquer can fail to converge on matrices with large
    clusters of tiny eigenvalues, e.g. a rank-2 factor of size 576; torch raises, JAX
    returns NaN), the decomposition is redone on the host by :func:`_host_eigh`.
    """
    xnp = Dense(matrix).xnp
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
        wide = xnp.cast(matrix, xnp.float64)
    try:
        values, vectors = xnp.eigh(wide)
    except RuntimeError:  # torch.linalg.LinAlgError: the solver did not converge
        values = vectors = None
    if values is None or not finite_or_traced(values.sum()):
        values, vectors = _host_eigh(wide)
    return xnp.cast(values, matrix.dtype), xnp.cast(vectors, matrix.dtype)


def _host_eigh(matrix: Array) -> tuple[Array, Array]:
    """Return ``(λ, Q)`` by SciPy on the host: LAPACK's ``syevr``, else the QR algorithm ``syev``.

    Raises:
        ValueError: when the matrix has non-finite entries, or neither driver converges.
    """
    xnp = Dense(matrix).xnp
    host = np.asarray(xnp.to_np(matrix), dtype=np.float64)
    if not np.isfinite(host).all():
        raise ValueError("a Kronecker factor has non-finite entries; it has no eigenbasis.")
    for driver in ("evr", "ev"):
        try:
            values, vectors = scipy.linalg.eigh(host, driver=driver)
        except np.linalg.LinAlgError:
            continue
        device = xnp.get_device(matrix)
        return (
            xnp.array(values, dtype=matrix.dtype, device=device),
            xnp.array(vectors, dtype=matrix.dtype, device=device),
        )
    raise ValueError("no symmetric eigensolver converged on a Kronecker factor.")


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
        super().__init__(eigenvalues.dtype, (size, size))

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
        super().__init__(values.dtype, (values.shape[0], values.shape[0]))

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


class KroneckerFactored(BlockDiag):
    """``P · BlockDiag(B_1, …, B_L) · Pᵀ`` with blocks whose spectrum is known in closed form.

    Each block is a :class:`KroneckerBlock` ``G_l ⊗ A_l``, an :class:`EigenKronecker`, a
    :class:`DiagonalBlock` ``diag(d)``, or any operator with the same spectral methods:
    ``spectrum()`` (all eigenvalues, flat), ``map_spectrum(f)`` (the block ``f(B)``, again
    such a block), ``scaled(c)``, ``eigenvector(i)``, ``diagonal()`` and ``trace()``. The
    dispatch rules only use these. ``permutation[j]`` is the position, in the user's
    parameter order, of coordinate ``j`` of the block-diagonal order, so the dense form is
    in the user's ``params`` order even when a layer's weight and bias are not adjacent.
    Products cost the blocks' products plus two gathers.
    """

    def __init__(
        self,
        blocks: Sequence[LinearOperator],
        permutation: Array,
        annotations: set | None = None,
        inverse_permutation: Array | None = None,
    ) -> None:
        super().__init__(*blocks)
        self.blocks = tuple(blocks)
        self.permutation = permutation
        self.inverse_permutation = (
            _inverse_permutation(permutation, self.xnp)
            if inverse_permutation is None
            else inverse_permutation
        )
        self.annotations = self.annotations | (annotations if annotations is not None else {PSD})

    def with_blocks(
        self, blocks: Sequence[LinearOperator], annotations: set | None = None
    ) -> KroneckerFactored:
        """Return the same permuted block structure with new blocks of the same sizes."""
        return KroneckerFactored(
            blocks,
            self.permutation,
            set(self.annotations) if annotations is None else annotations,
            self.inverse_permutation,
        )

    def map_spectrum(self, fn: Callable[[Array], Array]) -> KroneckerFactored:
        """Return ``P · BlockDiag(fn(B_l)) · Pᵀ`` for a spectral function ``fn`` of each block."""
        return self.with_blocks([block.map_spectrum(fn) for block in self.blocks])

    def inverse(self) -> KroneckerFactored:
        """Return ``P · BlockDiag(B_l⁻¹) · Pᵀ``.

        Blocks holding both factors become ``G⁻¹ ⊗ A⁻¹`` (two products per column), the
        others ``B⁻¹`` through their spectrum.
        """
        blocks = [
            block.inverse()
            if isinstance(block, KroneckerBlock)
            else block.map_spectrum(_reciprocal)
            for block in self.blocks
        ]
        return self.with_blocks(blocks)

    def damped(self, damping: float, mode: str = "exact") -> KroneckerFactored:
        """Return the damped operator, still Kronecker-factored.

        ``"exact"``: ``K + λ I``, every block ``(Q_G ⊗ Q_A)(S + λ)(Q_G ⊗ Q_A)ᵀ``.
        ``"heuristic"``: every ``G ⊗ A`` block becomes ``(G + √λ/π I) ⊗ (A + π√λ I)``
        (Martens & Grosse, 2015) and every diagonal block ``diag(d + λ)``; only for
        operators whose blocks are all of these two kinds.
        """
        mode = parse_option(DampingMode, mode, "damping mode")
        if known_nonnegative(damping) is False or not finite_or_traced(damping):
            raise ValueError(f"damping must be a finite non-negative number, got {damping}.")
        if mode is DampingMode.EXACT:
            return self.map_spectrum(lambda s: s + damping)
        if not all(isinstance(block, (KroneckerBlock, DiagonalBlock)) for block in self.blocks):
            raise ValueError(
                "heuristic damping needs blocks G ⊗ A with both factors (KFAC) or diagonal "
                "blocks; this operator has eigen-form blocks (EKFAC, or already damped or "
                "mapped): use mode='exact'."
            )
        return self.with_blocks([block.heuristically_damped(damping) for block in self.blocks])

    def damped_per_block(self, dampings: Array) -> KroneckerFactored:
        """Return ``K + ⊕_b λ_b I``: block ``b`` damped exactly by its own ``λ_b``."""
        if len(dampings) != len(self.blocks):
            raise ValueError(
                f"need {len(self.blocks)} dampings, one per block; got {len(dampings)}."
            )
        blocks = [
            block.map_spectrum(lambda s, damping=damping: s + damping)
            for block, damping in zip(self.blocks, dampings, strict=True)
        ]
        return self.with_blocks(blocks)

    def scaled(self, factor: Array) -> KroneckerFactored:
        """Return ``c K`` with every block scaled (``c`` may be a differentiable scalar)."""
        annotations = set(self.annotations) if known_nonnegative(factor) else set()
        return self.with_blocks([block.scaled(factor) for block in self.blocks], annotations)

    def eigenvalues(self) -> Array:
        """Return all eigenvalues, block by block (in block order)."""
        xnp = self.xnp
        return xnp.concat([block.spectrum() for block in self.blocks])

    def eigenvectors(self, indices: Sequence[int]) -> Array:
        """Return the eigenvectors of the given block-order eigenvalue ``indices`` as ``(D, k)``."""
        xnp = self.xnp
        starts, offset = [], 0
        for block in self.blocks:
            starts.append(offset)
            offset += block.shape[0]
        columns = []
        for index in indices:
            position = max(b for b, start in enumerate(starts) if start <= index)
            block = self.blocks[position]
            local = block.eigenvector(index - starts[position])
            before = starts[position]
            after = self.shape[0] - before - block.shape[0]
            zeros = [xnp.zeros((n,), dtype=self.dtype, device=self.device) for n in (before, after)]
            columns.append(self.from_block_order(xnp.concat([zeros[0], local, zeros[1]])))
        return xnp.stack(columns, axis=1)

    def diagonal(self) -> Array:
        """Return the diagonal in the user's parameter order."""
        return self.from_block_order(self.xnp.concat([block.diagonal() for block in self.blocks]))

    def trace(self) -> Array:
        """Return the trace, the sum of the blocks' traces."""
        return sum(block.trace() for block in self.blocks)

    def _matmat(self, X: Array) -> Array:
        """Return ``P BlockDiag(B) Pᵀ X``."""
        return super()._matmat(X[self.permutation])[self.inverse_permutation]

    def to_dense(self) -> Array:
        """Return the dense matrix in the user's parameter order."""
        dense = super().to_dense()
        return dense[self.inverse_permutation][:, self.inverse_permutation]

    def from_block_order(self, vector: Array) -> Array:
        """Reorder a vector given in block order into the user's parameter order."""
        return vector[self.inverse_permutation]


def _inverse_permutation(permutation: Array, xnp: Any) -> Array:
    """Return ``q`` with ``q[p[j]] = j``: one ``O(D)`` scatter (``argsort`` would sort)."""
    positions = xnp.arange(permutation.shape[0], device=xnp.get_device(permutation))
    return xnp.update_array(0 * permutation, xnp.cast(positions, permutation.dtype), permutation)


def _reciprocal(values: Array) -> Array:
    """Return ``1 / values``."""
    return 1 / values


def _symmetric_dense(op: LinearOperator) -> Array | None:
    """Return the array of a ``Dense`` operator holding a symmetric matrix, else ``None``."""
    if not isinstance(op, Dense) or op.shape[0] != op.shape[1]:
        return None
    matrix = op.A
    return matrix if bool(op.xnp.allclose(matrix, matrix.T)) else None


def _as_block(op: LinearOperator) -> KroneckerBlock | EigenKronecker | None:
    """Return ``op`` as a Kronecker-structured block when its structure allows, else ``None``."""
    if isinstance(op, (KroneckerBlock, EigenKronecker)):
        return op
    if isinstance(op, Kronecker) and len(op.Ms) == 2:
        factors = [_symmetric_dense(m) for m in op.Ms]
        return None if any(f is None for f in factors) else KroneckerBlock(*factors)
    matrix = _symmetric_dense(op)
    if matrix is None:
        return None
    one = op.xnp.ones((1, 1), dtype=op.dtype, device=op.device)
    return KroneckerBlock(matrix, one)


def as_kronecker_factored(op: LinearOperator) -> KroneckerFactored | None:
    """Return a user-built ``Kronecker`` / ``BlockDiag`` of symmetric dense factors as ours.

    ``Kronecker(Dense(G), Dense(A))`` and ``BlockDiag`` (multiplicities 1) of those or of
    symmetric ``Dense`` blocks become a :class:`KroneckerFactored` with the identity
    permutation; anything else gives ``None``. No annotation is assumed: ``PSD`` is set
    only when every block's eigenvalues are non-negative.
    """
    parts = op.Ms if isinstance(op, BlockDiag) and set(op.multiplicities) == {1} else (op,)
    blocks = [_as_block(part) for part in parts]
    if any(block is None for block in blocks):
        return None
    permutation = op.xnp.arange(op.shape[0], device=op.device)
    structured = KroneckerFactored(blocks, permutation, annotations=set())
    if bool((structured.eigenvalues() >= 0).all()):
        structured.annotations = structured.annotations | {PSD}
    return structured
