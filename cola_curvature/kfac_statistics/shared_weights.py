"""One Kronecker block for a weight that several layer calls use (a tied lm-head).

A weight used by ``K`` calls gets, from each call ``k`` alone, the KFAC block
``B_k ⊗ C_k`` of that use, written on the weight's common orientation (rows ⊗ columns of
one ``out × in`` matrix). An lm-head ``logits = h Wᵀ`` tied to a token embedding
``e = W[x]`` (``W`` ``V × d``) has ``G_head ⊗ A_head`` (``V × V`` ⊗ ``d × d``) and, from the
embedding, whose block is on ``Wᵀ``, ``diag(counts) ⊗ G_emb`` once turned to ``W``'s
orientation. Their sum is not one Kronecker product; the block used is the nearest one in
Frobenius norm (Van Loan & Pitsianis, 1993):

``X ⊗ Y = argmin ‖Σ_k B_k ⊗ C_k − X ⊗ Y‖_F``.

Rearranged (``vec(B) vec(C)ᵀ`` for each term), the sum is the rank-``K`` matrix
``R = 𝐁 𝐂ᵀ`` with columns ``vec B_k`` and ``vec C_k``, and the nearest Kronecker product
is its best rank-one part: ``X = Σ_k p_k B_k``, ``Y = Σ_k q_k C_k`` with ``p`` the top
eigenvector of ``Γ_C Γ_B`` (``Γ`` the ``K × K`` Gram matrices of Frobenius inner
products; computed through a symmetric ``K × K`` problem), scaled so that ``Σ_k p_k = 1``
(``X`` is a convex combination of the uses' row factors), and ``q = Γ_B p / (pᵀ Γ_B p)``.
The Gram matrices of PSD factors have non-negative entries, so ``p, q ≥ 0`` (Perron–
Frobenius) and ``X``, ``Y`` stay PSD. The cross terms between uses (the correlation of an
example's embedding and lm-head gradients) are dropped, as KFAC drops those between
positions. The block is exact when one use's factors vanish, or when all uses share a row
factor (or a column factor). Cost: ``K²`` inner products of the factors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cola.backends import get_library_fns

from cola_curvature.kfac_statistics.moments import (
    LayerSignals,
    TokenInputs,
    eigencorrection_term,
    summed_over_columns,
)
from cola_curvature.types import Array


@dataclass(frozen=True)
class SharedWeightLayer:
    """A weight (and bias) used by several calls, ``uses``, with one Kronecker block.

    Every use is a backend layer (a torch ``KroneckerLayer``, a JAX ``JaxKroneckerLayer``)
    on the same weight; its statistics are gathered as for any layer. The block acts on the
    orientation of the first use that is not an embedding (``out × in``; an embedding's
    block is on the transposed table), so ``weight_positions`` is that use's grid, and a use
    whose grid is its transpose is ``transposed``. All uses have the same bias (an
    lm-head with a bias cannot share a block with the table it is tied to: see
    :func:`shared_weight_rejection`).
    """

    name: str
    uses: tuple[Any, ...]

    @property
    def kind(self) -> str:
        """Return ``"shared"``."""
        return "shared"

    @property
    def reference(self) -> Any:
        """Return the use whose orientation the block takes."""
        return next((use for use in self.uses if use.kind != "embedding"), self.uses[0])

    @property
    def weight_index(self) -> int:
        """Return the weight's position in ``params``."""
        return self.reference.weight_index

    @property
    def bias_index(self) -> int | None:
        """Return the shared bias's position in ``params``, ``None`` without one."""
        return self.reference.bias_index

    @property
    def weight_positions(self) -> np.ndarray:
        """Return the flat weight position of block entry ``(o, i)`` (the reference grid)."""
        return np.asarray(self.reference.weight_positions)

    @property
    def out_features(self) -> int:
        """Return the dimension of the row factor ``X``."""
        return self.weight_positions.shape[0]

    @property
    def weight_columns(self) -> int:
        """Return the number of weight columns in the block's orientation."""
        return self.weight_positions.shape[1]

    @property
    def in_features(self) -> int:
        """Return the dimension of the column factor ``Y`` (weight columns plus bias)."""
        return self.reference.in_features

    def transposed(self, use: Any) -> bool:
        """Return whether ``use``'s block is on the transpose of this block's orientation."""
        return not np.array_equal(np.asarray(use.weight_positions), self.weight_positions)


def shared_weight_rejection(uses: Sequence[Any]) -> str | None:
    """Return why the layers ``uses`` (on one weight) cannot share a block, or ``None``.

    Each use's grid must be the block's grid or its transpose; a bias must be shared by all
    uses (a transposed use has none).
    """
    layer = SharedWeightLayer("", tuple(uses))
    for use in uses:
        grid = np.asarray(use.weight_positions)
        if layer.transposed(use) and not np.array_equal(grid.T, layer.weight_positions):
            return "its calls view it as matrices of different shapes"
        if use.bias_index != layer.bias_index:
            return "its calls add different biases (a tied lm-head with its own bias)"
    return None


def use_layers(layers: Sequence[Any]) -> list[Any]:
    """Return the layers whose statistics are gathered: each shared weight's uses in turn."""
    flat = []
    for layer in layers:
        flat.extend(layer.uses if isinstance(layer, SharedWeightLayer) else [layer])
    return flat


def oriented_factors(
    layer: SharedWeightLayer, use: Any, output_factor: Array, input_factor: Array
) -> tuple[Array, Array]:
    """Return a use's ``(G, A)`` as ``(row, column)`` factors of the shared block.

    A transposed use (an embedding's block ``G_emb ⊗ A_emb`` on ``Wᵀ``) swaps them:
    ``vec(Wᵀ)`` is ``vec(W)`` permuted, and the permuted ``G ⊗ A`` is ``A ⊗ G``.
    """
    if layer.transposed(use):
        return input_factor, output_factor
    return output_factor, input_factor


def _frobenius(first: Array, second: Array) -> float:
    """Return ``⟨F₁, F₂⟩_F`` of two factors, each dense or stored as its diagonal."""
    xnp = get_library_fns(first.dtype)
    if first.ndim == 1 and second.ndim == 2:
        second = xnp.diag(second)
    elif first.ndim == 2 and second.ndim == 1:
        first = xnp.diag(first)
    return float((first * second).sum())


def _gram(factors: Sequence[Array]) -> np.ndarray:
    """Return the ``K × K`` matrix of Frobenius inner products of ``factors``."""
    size = len(factors)
    gram = np.zeros((size, size))
    for i in range(size):
        for j in range(i, size):
            gram[i, j] = gram[j, i] = _frobenius(factors[i], factors[j])
    return gram


def _combination(coefficients: np.ndarray, factors: Sequence[Array]) -> Array:
    """Return ``Σ_k c_k F_k``: a diagonal (1-d) when every ``F_k`` is, else a dense matrix."""
    terms = [float(c) * factor for c, factor in zip(coefficients, factors, strict=True)]
    dense = [term for term in terms if term.ndim == 2]
    if not dense:
        return sum(terms[1:], terms[0])
    xnp = get_library_fns(dense[0].dtype)
    total = sum(dense[1:], dense[0])
    diagonal = [term for term in terms if term.ndim == 1]
    return total + xnp.diag(sum(diagonal[1:], diagonal[0])) if diagonal else total


def _range_factor(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(L, U)`` with ``Γ = U L² Uᵀ`` restricted to its numerical range."""
    values, vectors = np.linalg.eigh(gram)
    keep = values > 1e-14 * max(values.max(), 0.0)
    return np.sqrt(values[keep]), vectors[:, keep]


def nearest_kronecker(pairs: Sequence[tuple[Array, Array]]) -> tuple[Array, Array]:
    """Return ``(X, Y)``, the Frobenius-nearest ``X ⊗ Y`` to ``Σ_k B_k ⊗ C_k``.

    With ``Γ_B = U_B L_B² U_Bᵀ`` and ``Γ_C`` likewise, ``𝐁 = Q_B L_B U_Bᵀ`` for orthonormal
    ``Q_B``, so ``R = Q_B (L_B U_Bᵀ U_C L_C) Q_Cᵀ``: the top singular pair ``(s, t)`` of
    the small middle matrix gives the top left singular vector ``𝐁 p``, ``p = U_B L_B⁻¹ s``
    (module docstring for the scaling of ``p`` and ``q``). Zero factors (a use with no
    gradient) drop out.
    """
    rows, columns = [b for b, _ in pairs], [c for _, c in pairs]
    gram_rows, gram_columns = _gram(rows), _gram(columns)
    if len(pairs) == 1 or not gram_rows.any() or not gram_columns.any():
        return _combination(np.ones(len(pairs)), rows), _combination(np.eye(len(pairs))[0], columns)
    scale_b, basis_b = _range_factor(gram_rows)
    scale_c, basis_c = _range_factor(gram_columns)
    middle = (scale_b[:, None] * (basis_b.T @ basis_c)) * scale_c[None, :]
    left, _, _ = np.linalg.svd(middle)
    p = basis_b @ (left[:, 0] / scale_b)
    p = p / p.sum()
    q = gram_rows @ p / (p @ gram_rows @ p)
    return _combination(np.clip(p, 0.0, None), rows), _combination(np.clip(q, 0.0, None), columns)


def _projected(x: Array, basis: Array | None) -> Array:
    """Return ``x Q`` per position, ``(…, N, T, k)``; token inputs as gathered rows of ``Q``."""
    if isinstance(x, TokenInputs):
        xnp = get_library_fns(x.weights.dtype)
        if basis is None:
            basis = xnp.eye(
                x.num_classes,
                x.num_classes,
                dtype=x.weights.dtype,
                device=xnp.get_device(x.weights),
            )
        return basis[x.indices] * x.weights[..., None]
    return x if basis is None else x @ basis


def shared_eigencorrection_term(
    layer: SharedWeightLayer,
    inputs: dict[str, Any],
    basis: tuple[Array | None, Array | None],
) -> Callable[[dict[str, Array]], Array]:
    """Return ``grads ↦ Σ_{n,c} (Q_Xᵀ ∇W_{n,c} Q_Y)²`` over a chunk of columns, for a shared weight.

    ``∇W_{n,c}`` is example ``n``'s gradient of the shared weight for column ``c``: the sum
    over uses of ``Σ_t g_t ã_tᵀ`` (a transposed use contributes ``Σ_t ã_t g_tᵀ``, e.g.
    ``e_{x_t} g_tᵀ`` from an embedding); ``grads`` maps each use's name to its gradients.
    The inputs are projected once for all chunks. Memory ``O(c N out in)`` per chunk of
    ``c`` columns, the per-example gradients in the eigenbasis.
    """
    q_rows, q_columns = basis
    projected = {
        use.name: _projected(inputs[use.name], q_rows if layer.transposed(use) else q_columns)
        for use in layer.uses
    }

    def term(grads: dict[str, Array]) -> Array:
        total = 0
        for use in layer.uses:
            if layer.transposed(use):
                rows, columns = projected[use.name][None], _projected(grads[use.name], q_columns)
            else:
                rows, columns = _projected(grads[use.name], q_rows), projected[use.name][None]
            xnp = get_library_fns(columns.dtype)
            total = total + xnp.moveaxis(rows, -1, -2) @ columns
        return (total**2).sum(0).sum(0)

    return term


def layer_eigencorrections(
    signals: LayerSignals, layers: Sequence[Any], bases: dict[str, tuple[Array, Array]]
) -> dict[str, Array]:
    """Return one batch's EKFAC ``S = R Σ_{n,c} (Q_Gᵀ ∇W_{n,c} Q_A)²`` per layer name.

    ``signals`` are those of :func:`use_layers` ``(layers)``; a plain layer's term is
    :func:`~cola_curvature.kfac_statistics.moments.eigencorrection_term`, a shared
    weight's :func:`shared_eigencorrection_term` (which reads all its uses' gradients).
    The output gradients are read once, chunk by chunk
    (:func:`~cola_curvature.kfac_statistics.moments.summed_over_columns`), so streamed
    signals serve every layer.
    """
    terms = {
        layer.name: shared_eigencorrection_term(layer, signals.inputs, bases[layer.name])
        if isinstance(layer, SharedWeightLayer)
        else eigencorrection_term(signals.inputs, layer.name, *bases[layer.name])
        for layer in layers
    }
    return summed_over_columns(signals, terms)
