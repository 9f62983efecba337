"""Backend-neutral KFAC and EKFAC statistics from captured layer inputs and output gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cola.backends import get_library_fns

from cola_curvature.losses import Loss
from cola_curvature.options import FisherType, KFACApprox
from cola_curvature.types import Array


@dataclass(frozen=True)
class TokenInputs:
    """An embedding's inputs, the one-hot rows ``e_{x_{n,t}} ∈ R^V``, stored as the tokens ``x``.

    ``indices`` and ``weights`` have shape ``(N, T)``; a weight is 1, or 0 where the token
    is the padding index (whose row gets no gradient). ``segment_sum(values, ids, count)``
    (the backend's scatter-add) returns ``(count, …)`` whose row ``k`` sums the rows of
    ``values`` with id ``k``. No ``(N T) × V`` one-hot matrix is ever formed.
    """

    indices: Array
    weights: Array
    num_classes: int
    segment_sum: Callable[[Array, Array, int], Array]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Return ``(N, T, V)``, the shape of the one-hot inputs."""
        return (*self.indices.shape, self.num_classes)

    def _same_token(self) -> Array:
        """Return ``M_n[t, t'] = w_{n,t} w_{n,t'} [x_{n,t} = x_{n,t'}]``, shape ``(N, T, T)``."""
        same = self.indices[:, :, None] == self.indices[:, None, :]
        return same * (self.weights[:, :, None] * self.weights[:, None, :])

    def second_moment(self, approx: KFACApprox) -> Array:
        """Return the diagonal of ``Σ_{n,t} e eᵀ`` (expand) or of ``Σ_n ē_n ē_nᵀ`` (reduce).

        Expand: the token counts, exactly (the moment is diagonal). Reduce, with
        ``ē_n = (1/T) Σ_t e_{x_{n,t}}``: ``Σ_n c_{n,v}² / T²`` from the per-example counts
        ``c_{n,v}``; the off-diagonal of that moment (tokens sharing an example) is dropped,
        so the factor stays diagonal. ``c_{n,v}² = Σ_{t: x_{n,t} = v} Σ_{t'} M_n[t, t']``.
        """
        tokens = self.indices.reshape(-1)
        if approx is KFACApprox.EXPAND:
            return self.segment_sum(self.weights.reshape(-1), tokens, self.num_classes)
        pairs = self._same_token().sum(-1).reshape(-1)
        return self.segment_sum(pairs, tokens, self.num_classes) / self.indices.shape[1] ** 2

    def squared_gradients(self, projected_grads: Array) -> Array:
        """Return ``Σ_{n,c} (Σ_t w_{n,t} p_{c,n,t} e_{x_{n,t}}ᵀ)²`` (entrywise), ``(out, V)``.

        ``p`` ``(C', N, T, out)`` are projected output gradients: this is EKFAC's ``S`` for a
        diagonal input factor (identity basis). A token's squared sum is
        ``Σ_{t,t'} M_n[t, t'] p_t ⊙ p_{t'}``, so ``r_{n,t} = Σ_c p_{c,n,t} ⊙ (M_n p_{c,n})_t``
        summed per token gives it: memory ``O(C' N T out + N T²)``, never ``(N, V, out)``.
        """
        paired = (projected_grads * (self._same_token() @ projected_grads)).sum(0)
        rows = paired.reshape(-1, paired.shape[-1])
        return self.segment_sum(rows, self.indices.reshape(-1), self.num_classes).T


def _second_moment(
    x: Array, approx: KFACApprox, reduce_op: str, example_major: bool = False
) -> Array:
    """Return ``Σ_{n,t} x xᵀ`` (expand) or ``Σ_n x̄ x̄ᵀ`` with ``x̄ = op_t x`` (reduce).

    Expand is one product of the ``(N T, features)`` matrix ``X`` with itself, ``Xᵀ X``,
    read in place whichever way ``x`` is stored: as ``(Xᵀ) (Xᵀ)ᵀ`` when the features are
    the slowest axis in memory (a torch conv's patches, :func:`_features_slowest`), else as
    ``Xᵀ X`` of the row-major rows (a linear layer's input as called, an array without
    strides); neither copies ``x``. With ``example_major`` (``x`` stored example by
    example, as autograd returns output gradients) and at least as many positions ``T`` as
    features, the ``N`` per-example products ``x_nᵀ x_n`` are summed instead: partial sums
    no larger. Token inputs give the diagonal of their moment
    (:meth:`TokenInputs.second_moment`). Cost ``O(N T features²)``.
    """
    if isinstance(x, TokenInputs):
        return x.second_moment(approx)
    if approx is KFACApprox.REDUCE:
        x = x.mean(1) if reduce_op == "mean" else x.sum(1)
        return x.T @ x
    xnp = get_library_fns(x.dtype)
    if example_major and x.shape[1] >= x.shape[-1]:
        return (xnp.moveaxis(x, -1, -2) @ x).sum(0)
    if _features_slowest(x):
        columns = xnp.moveaxis(x, -1, 0).reshape(x.shape[-1], -1)
        return columns @ columns.T
    rows = x.reshape(-1, x.shape[-1])
    return rows.T @ rows


def _features_slowest(x: Array) -> bool:
    """Return whether ``x``'s last axis is its slowest in memory (a strided, feature-major array).

    Arrays without strides (JAX) give ``False``: their row-major reshape is free.
    """
    features = x.ndim - 1
    strides = x.stride() if callable(getattr(x, "stride", None)) else None
    if strides is None or x.shape[features] == 1:
        return False
    return strides[features] == x.numel() // x.shape[features]


def _augment(a: Array, layer: Any) -> Array:
    """Return the block's input features ``ã``: ``[a, 1]``, ``a`` or ``[1]``.

    The weight contributes ``a`` when it is part of the curvature (``layer.weight_index``
    is set), the bias a constant 1 (``layer.bias_index`` is set). The ones are appended as
    the last feature, one row-major copy (a linear layer's input is stored row by row, so
    the copy reads it in order; :func:`_second_moment` then reads the rows in place).
    """
    if layer.weight_index is None:
        a = a[..., :0]
    if layer.bias_index is None:
        return a
    xnp = get_library_fns(a.dtype)
    return xnp.concat([a, xnp.ones_like(a[..., :1])], axis=-1)


@dataclass(frozen=True)
class SignalRequest:
    """What a backend captures per layer for KFAC and EKFAC, batch after batch.

    Attributes:
        layers: The layers (a shared weight's uses included: backends run
            :func:`~cola_curvature.kfac_statistics.shared_weights.use_layers` on them).
        num_data: ``N``, for the loss scaling ``R``.
        fisher_type: Which output cotangents are back-propagated.
        mc_samples: Samples per example for the Monte-Carlo Fisher.
    """

    layers: tuple[Any, ...]
    num_data: int
    fisher_type: FisherType
    mc_samples: int


@dataclass
class BatchStatistics:
    """Unnormalised KFAC statistics of one batch, per layer name.

    ``input_moments[l] = Σ ã ãᵀ`` and ``output_moments[l] = R Σ g gᵀ`` (sums over examples,
    positions for expand, and backpropagated columns); ``positions[l]`` is ``T``.
    """

    input_moments: dict[str, Array]
    output_moments: dict[str, Array]
    positions: dict[str, int]


def output_cotangents(
    loss: Loss,
    outputs: Array,
    targets: Array,
    fisher_type: FisherType,
    mc_samples: int,
    rng: object,
) -> Array:
    """Return the vectors ``u_c`` to backpropagate, shape ``(C', *f.shape)``.

    type-2: the columns of the loss Hessian's symmetric factor (``Σ_c u_c u_cᵀ = H``);
    mc: ``mc_samples`` sampled output gradients scaled by ``1/√M`` (``E[Σ u uᵀ] = H``);
    empirical: the observed output gradient.
    """
    if fisher_type is FisherType.TYPE2:
        return loss.hessian_sqrt(outputs, targets)
    if fisher_type is FisherType.MC:
        return loss.sampled_output_gradients(outputs, rng, mc_samples) / mc_samples**0.5
    return loss.output_gradient(outputs, targets)[None]


@dataclass
class LayerSignals:
    """Per layer: inputs ``ã`` as ``(N, T, in [+1])`` and output gradients ``(C', N, T, out)``.

    An embedding's inputs are :class:`TokenInputs`. ``scale`` is the loss scaling ``R``;
    ``output_grads`` is ``None`` for forward-only. Instead of ``output_grads``, a backend
    may pass ``streamed``: a one-shot iterable of such dicts whose ``C'`` axes together
    make up the columns (the torch backend yields one column per backward pass, so only one
    column is ever held). Every statistic is a sum over columns, so consumers read
    :meth:`output_grad_chunks` once and add up.
    """

    inputs: dict[str, Array]
    output_grads: dict[str, Array] | None
    scale: float
    streamed: Iterable[dict[str, Array]] | None = None

    def output_grad_chunks(self) -> Iterator[dict[str, Array]]:
        """Yield the output gradients in chunks of columns: ``streamed``, else ``output_grads``."""
        if self.streamed is not None:
            yield from self.streamed
        elif self.output_grads is not None:
            yield self.output_grads

    @property
    def backpropagated(self) -> bool:
        """Return whether there are output gradients (``False`` for forward-only)."""
        return self.output_grads is not None or self.streamed is not None


def batch_statistics(signals: LayerSignals, kfac_approx: KFACApprox) -> BatchStatistics:
    """Return one batch's ``Σ ã ãᵀ`` and ``R Σ g gᵀ`` per layer from its signals.

    With ``kfac_approx="reduce"`` the shared positions are averaged (inputs) or summed
    (output gradients) per example first (Eschenhagen et al., 2023). The ``C'`` columns of
    each chunk of output gradients are folded into the example axis, so each factor is one
    product per chunk, added up over the chunks.
    """
    input_moments = {
        name: _second_moment(a, kfac_approx, "mean") for name, a in signals.inputs.items()
    }
    positions = {name: a.shape[1] for name, a in signals.inputs.items()}
    terms = {name: _output_moment(name, kfac_approx) for name in signals.inputs}
    output_moments = summed_over_columns(signals, terms) if signals.backpropagated else {}
    return BatchStatistics(input_moments, output_moments, positions)


def _output_moment(name: str, kfac_approx: KFACApprox) -> Callable[[dict[str, Array]], Array]:
    """Return ``grads ↦ Σ g gᵀ`` of layer ``name`` over a chunk's columns and examples."""

    def term(grads: dict[str, Array]) -> Array:
        g = grads[name]
        columns = g.reshape(-1, g.shape[2], g.shape[3])
        return _second_moment(columns, kfac_approx, "sum", example_major=True)

    return term


def batch_eigencorrections(
    signals: LayerSignals, bases: dict[str, tuple[Array, Array]]
) -> dict[str, Array]:
    """Return ``R Σ_{n,c} (Q_Gᵀ ∇W_{n,c} Q_A)²`` per layer, shape ``(out, in [+1])``.

    ``∇W_{n,c} = Σ_t g_{n,t,c} ã_{n,t}ᵀ`` is example ``n``'s gradient for column ``c``
    (true per-example gradients, positions summed) and ``(Q_G, Q_A)`` the eigenbases of the
    layer's Kronecker factors (George et al., 2018). Without shared positions (``T = 1``) the
    projected gradient is an outer product, ``(Q_Gᵀ g)(Q_Aᵀ ã)ᵀ``, so its square is the outer
    product of the squares: one ``(out × N) · (N × in)`` product after summing the squared
    output gradients over ``c``, never the ``(C', N, out, in)`` per-example gradients that
    ``T > 1`` needs. An embedding's input factor is diagonal (``Q_A = I``): see
    :meth:`TokenInputs.squared_gradients`.
    """
    terms = {
        name: eigencorrection_term(signals.inputs, name, *basis) for name, basis in bases.items()
    }
    return summed_over_columns(signals, terms)


def summed_over_columns(
    signals: LayerSignals, terms: dict[str, Callable[[dict[str, Array]], Array]]
) -> dict[str, Array]:
    """Return ``R Σ_chunks term(chunk)`` per name of ``terms``, reading the gradients once.

    ``terms[name]`` maps one chunk of output gradients (per layer, ``(c, N, T, out)``) to
    that chunk's part of a statistic that is a sum over columns.
    """
    sums: dict[str, Array] = {}
    for chunk in signals.output_grad_chunks():
        for name, term in terms.items():
            sums[name] = sums.get(name, 0) + term(chunk)
        del chunk  # a streamed chunk is released before the next one is computed
    return {name: signals.scale * total for name, total in sums.items()}


def eigencorrection_term(
    inputs: dict[str, Array | TokenInputs], name: str, q_out: Array, q_in: Array
) -> Callable[[dict[str, Array]], Array]:
    """Return ``grads ↦ Σ_{n,c} (Q_Gᵀ ∇W_{n,c} Q_A)²`` of layer ``name``, ``(out, in [+1])``.

    The sum runs over one chunk's columns ``c`` (``grads[name]``, ``(c, N, T, out)``); the
    inputs are projected once, ``ã Q_A`` (``O(N T in²)``), for all chunks.
    """
    a = inputs[name]
    if isinstance(a, TokenInputs):
        return lambda grads: a.squared_gradients(grads[name] @ q_out)
    projected_a = a @ q_in
    if a.shape[1] == 1:
        squared_a = projected_a[:, 0] ** 2
        return lambda grads: ((grads[name] @ q_out)[:, :, 0] ** 2).sum(0).T @ squared_a
    xnp = get_library_fns(a.dtype)

    def term(grads: dict[str, Array]) -> Array:
        per_example = xnp.moveaxis(grads[name] @ q_out, -1, -2) @ projected_a
        return (per_example**2).sum(0).sum(0)

    return term
