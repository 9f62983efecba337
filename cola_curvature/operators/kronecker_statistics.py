"""Backend-neutral KFAC and EKFAC statistics from captured layer inputs and output gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cola.backends import get_library_fns

from cola_curvature.losses import Loss
from cola_curvature.options import FisherType, KFACApprox

Array = Any


def _second_moment(
    x: Array, approx: KFACApprox, reduce_op: str, example_major: bool = False
) -> Array:
    """Return ``Σ_{n,t} x xᵀ`` (expand) or ``Σ_n x̄ x̄ᵀ`` with ``x̄ = op_t x`` (reduce).

    Expand is one product ``Xᵀ (Xᵀ)ᵀ`` of the feature-major ``(features, N T)`` matrix, free
    to form when the features are the slowest axis in memory (the torch backend's inputs).
    With ``example_major`` (``x`` stored example by example, as autograd returns output
    gradients) and at least as many positions ``T`` as features, the ``N`` per-example
    products ``x_nᵀ x_n`` are summed instead: no copy of ``x``, partial sums no larger.
    """
    if approx is KFACApprox.REDUCE:
        x = x.mean(1) if reduce_op == "mean" else x.sum(1)
        return x.T @ x
    xnp = get_library_fns(x.dtype)
    if example_major and x.shape[1] >= x.shape[-1]:
        return (xnp.moveaxis(x, -1, -2) @ x).sum(0)
    columns = xnp.moveaxis(x, -1, 0).reshape(x.shape[-1], -1)
    return columns @ columns.T


def _augment(a: Array, layer: Any) -> Array:
    """Return the block's input features ``ã``: ``[a, 1]``, ``a`` or ``[1]``.

    The weight contributes ``a`` when it is part of the curvature (``layer.weight_index``
    is set), the bias a constant 1 (``layer.bias_index`` is set). The ones are appended
    along the leading axis of the feature-major view, so feature-major inputs stay so.
    """
    if layer.weight_index is None:
        a = a[..., :0]
    if layer.bias_index is None:
        return a
    xnp = get_library_fns(a.dtype)
    features = xnp.moveaxis(a, -1, 0)
    return xnp.moveaxis(xnp.concat([features, xnp.ones_like(features[:1])], axis=0), 0, -1)


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
        return loss.hessian_sqrt(outputs)
    if fisher_type is FisherType.MC:
        return loss.sampled_output_gradients(outputs, rng, mc_samples) / mc_samples**0.5
    return loss.output_gradient(outputs, targets)[None]


@dataclass
class LayerSignals:
    """Per layer: inputs ``ã`` as ``(N, T, in [+1])`` and output gradients ``(C', N, T, out)``.

    ``scale`` is the loss scaling ``R``; ``output_grads`` is ``None`` for forward-only.
    """

    inputs: dict[str, Array]
    output_grads: dict[str, Array] | None
    scale: float


def batch_statistics(signals: LayerSignals, kfac_approx: KFACApprox) -> BatchStatistics:
    """Return one batch's ``Σ ã ãᵀ`` and ``R Σ g gᵀ`` per layer from its signals.

    With ``kfac_approx="reduce"`` the shared positions are averaged (inputs) or summed
    (output gradients) per example first (Eschenhagen et al., 2023). The ``C'`` columns of
    the output gradients are folded into the example axis, so each factor is one product.
    """
    input_moments = {
        name: _second_moment(a, kfac_approx, "mean") for name, a in signals.inputs.items()
    }
    positions = {name: a.shape[1] for name, a in signals.inputs.items()}
    output_moments = {}
    if signals.output_grads is not None:
        for name, g in signals.output_grads.items():
            columns = g.reshape(-1, g.shape[2], g.shape[3])
            moment = _second_moment(columns, kfac_approx, "sum", example_major=True)
            output_moments[name] = signals.scale * moment
    return BatchStatistics(input_moments, output_moments, positions)


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
    ``T > 1`` needs.
    """
    corrections = {}
    for name, (q_out, q_in) in bases.items():
        a, g = signals.inputs[name], signals.output_grads[name]
        projected_a = a @ q_in
        projected_g = g @ q_out
        if a.shape[1] == 1:
            squares = (projected_g[:, :, 0] ** 2).sum(0).T @ projected_a[:, 0] ** 2
        else:
            xnp = get_library_fns(a.dtype)
            per_example = xnp.moveaxis(projected_g, -1, -2) @ projected_a
            squares = (per_example**2).sum(0).sum(0)
        corrections[name] = signals.scale * squares
    return corrections
