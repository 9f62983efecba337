"""KFAC statistics of the dense, convolution and embedding layers of a JAX ``model_fn``.

The layers are found in its jaxpr. Convention: a layer's input has its example axis as the
leading free axis (the first axis not contracted with the weight; the batch axis of a
convolution; the first axis of an embedding's indices); further free axes are shared
positions ``T`` (sequence entries, pixels, tokens), as for a torch ``Linear`` on a sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cola_curvature.backends.jax.jaxpr_layers import find_sites
from cola_curvature.backends.jax.jaxpr_replay import replay
from cola_curvature.backends.jax.jaxpr_sites import Site
from cola_curvature.backends.jax.state import JaxExampleRandom
from cola_curvature.kfac_statistics.moments import (
    BatchStatistics,
    LayerSignals,
    _augment,
    batch_statistics,
    output_cotangents,
)
from cola_curvature.kfac_statistics.shared_weights import (
    SharedWeightLayer,
    layer_eigencorrections,
    shared_weight_rejection,
)
from cola_curvature.losses import Loss
from cola_curvature.options import FisherType, KFACApprox
from cola_curvature.types import Array, PyTree

ModelFn = Callable[[PyTree, Any], Array]

jax.tree_util.register_pytree_node(
    BatchStatistics,
    lambda s: ((s.input_moments, s.output_moments), tuple(sorted(s.positions.items()))),
    lambda positions, moments: BatchStatistics(*moments, dict(positions)),
)


@dataclass(frozen=True)
class JaxKroneckerLayer:
    """A ``dot_general``, ``conv_general_dilated`` or embedding ``gather`` on leaves.

    The interface matches the torch backend's ``KroneckerLayer``: ``kind`` is ``"dense"``,
    ``"conv"`` or ``"embedding"``; ``weight_index`` and ``bias_index`` are leaf positions in
    flat ``params`` order; ``weight_positions[o, i]`` is the flat position inside the weight
    leaf of block entry ``(o, i)`` (for a flax ``(in, out)`` kernel the transpose of a
    row-major grid; for a conv kernel the kernel's indices ordered ``(out, in, *filter)``;
    for an embedding table ``W`` (``V × d``) the grid of ``Wᵀ``, as in torch).
    ``call_index`` counts the layers on the same weight leaf before this one (the uses of a
    :class:`~cola_curvature.kfac_statistics.shared_weights.SharedWeightLayer`).
    """

    name: str
    kind: str
    weight_index: int
    bias_index: int | None
    out_features: int
    weight_columns: int
    weight_positions: np.ndarray = field(compare=False, repr=False)
    call_index: int = 0

    @property
    def in_features(self) -> int:
        """Return the dimension of the input factor ``A``: weight columns plus bias column."""
        return self.weight_columns + (self.bias_index is not None)


def _flat_model(model_fn: ModelFn, treedef: Any) -> Callable[[list[Array], Any], Array]:
    """Return ``(leaves, inputs) -> model_fn(params, inputs)``."""
    return lambda leaves, inputs: model_fn(treedef.unflatten(leaves), inputs)


def _sites(model_fn: ModelFn, params: PyTree, names: Sequence[str], inputs: Any) -> tuple:
    """Return the traced jaxpr of ``model_fn`` on ``inputs``, its arguments and its sites."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    closed = jax.make_jaxpr(_flat_model(model_fn, treedef))(leaves, inputs)
    sites = find_sites(closed.jaxpr, names, [leaf.size for leaf in leaves])
    return closed, jax.tree_util.tree_leaves((leaves, inputs)), sites


def _one_more_example(inputs: Any) -> Any:
    """Return ``inputs`` as abstract arrays with one more entry along each leading axis."""

    def grown(x: Any) -> Any:
        if isinstance(x, (jax.Array, np.ndarray)) and x.ndim > 0:
            return jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), x.dtype)
        return x

    return jax.tree_util.tree_map(grown, inputs)


def _numbered(sites: Sequence[Site]) -> dict[tuple[int, int], Site]:
    """Return the sites keyed by ``(weight leaf, number of earlier sites on that leaf)``."""
    counts: dict[int, int] = {}
    keyed = {}
    for site in sites:
        keyed[site.weight, counts.get(site.weight, 0)] = site
        counts[site.weight] = counts.get(site.weight, 0) + 1
    return keyed


def _lookups_per_example(
    model_fn: ModelFn, params: PyTree, names: Sequence[str], inputs: Any, sites: list[Site]
) -> list[Site]:
    """Return ``sites`` without the weights with a lookup that is not one per example.

    A table that all examples share (positions ``W[arange(T)]``, a flax ``nn.Embed`` on
    ``jnp.arange(T)``) is no Kronecker layer, as in torch: the leading axis of its indices
    does not grow with the batch. ``model_fn`` is traced again, abstractly, on one more
    example; an embedding stays when the leading axis of its indices grew by one. Every
    site of a weight with such a lookup goes (its uses would be incomplete).
    """
    if all(site.kind != "embedding" for site in sites):
        return sites
    _, _, grown = _sites(model_fn, params, names, _one_more_example(inputs))
    grown_sites = _numbered(grown)
    shared = {
        key[0]
        for key, site in _numbered(sites).items()
        if site.kind == "embedding"
        and (
            key not in grown_sites
            or grown_sites[key].output_aval.shape[0] != site.output_aval.shape[0] + 1
        )
    }
    return [site for site in sites if site.weight not in shared]


def kronecker_layers(
    model_fn: ModelFn, params: PyTree, names: Sequence[str], inputs: Any
) -> list[JaxKroneckerLayer | SharedWeightLayer]:
    """Return the layers of ``model_fn`` traced on ``inputs``, in program order.

    A leaf that another operation uses too (any primitive outside a layer) is left out (see
    :meth:`~cola_curvature.backends.jax.jaxpr_layers.LayerSearch.owned_sites`), and so is a
    table whose lookups are not one per example (:func:`_lookups_per_example`). Several
    layers on one weight leaf (a tied lm-head) are the uses of one
    :class:`~cola_curvature.kfac_statistics.shared_weights.SharedWeightLayer`, unless they
    disagree on the bias or a bias leaf serves several weights (then they are left out).

    Raises:
        ValueError: when a convolution is grouped or transposed.
    """
    _, _, sites = _sites(model_fn, params, names, inputs)
    sites = _lookups_per_example(model_fn, params, names, inputs, sites)
    uses: dict[int, list[JaxKroneckerLayer]] = {}
    for (weight, call_index), site in _numbered(sites).items():
        uses.setdefault(weight, []).append(
            JaxKroneckerLayer(
                name=names[weight],
                kind=site.kind,
                weight_index=weight,
                bias_index=site.bias,
                out_features=site.weight_positions.shape[0],
                weight_columns=site.weight_positions.shape[1],
                weight_positions=site.weight_positions,
                call_index=call_index,
            )
        )
    biases = [use.bias_index for group in uses.values() for use in group]
    layers = []
    for weight, group in uses.items():
        if len(group) == 1:
            layers.append(group[0])
            continue
        group = [replace(use, name=f"{use.name}#{use.call_index}") for use in group]
        bias = group[0].bias_index
        if shared_weight_rejection(group) is None and (
            bias is None or biases.count(bias) == len(group)
        ):
            layers.append(SharedWeightLayer(names[weight], tuple(group)))
    return layers


def _matched(sites: Sequence[Site], layers: Sequence[JaxKroneckerLayer]) -> list[Site]:
    """Return the site of each layer in this trace, raising if one is missing.

    Other sites (one the first batch left out, such as a table all examples share) are
    not layers and stay out.
    """
    by_key = _numbered(sites)
    keys = [(layer.weight_index, layer.call_index) for layer in layers]
    missing = [
        layer.name
        for layer, key in zip(layers, keys, strict=True)
        if key not in by_key
        or (by_key[key].kind, by_key[key].bias) != (layer.kind, layer.bias_index)
    ]
    if missing:
        raise ValueError(
            f"model_fn has no layer on {', '.join(missing)} on this batch (found on the first "
            "one); KFAC needs the same layers for every batch."
        )
    return [by_key[key] for key in keys]


@dataclass(frozen=True)
class SignalOptions:
    """What one batch's layer signals depend on besides the arrays (static under ``jit``).

    ``model_fn`` and ``loss`` compare by identity, so operators built again on the same
    model and loss (e.g. a KFAC refreshed every optimisation step) reuse the compiled
    program of each batch shape.
    """

    model_fn: ModelFn
    loss: Loss
    leaf_names: tuple[str, ...]
    layers: tuple[JaxKroneckerLayer, ...]
    num_data: int
    fisher_type: FisherType
    mc_samples: int


def layer_signals(
    options: SignalOptions,
    params: PyTree,
    inputs: Any,
    targets: Array,
    rng: JaxExampleRandom | None,
) -> LayerSignals:
    """Return every layer's inputs and backpropagated output gradients on one batch.

    The jaxpr is replayed with a zero perturbation ``δ_l`` added to every layer output
    ``s_l`` (after its bias), recording each layer input ``a_l``; one ``jax.vjp`` w.r.t. the
    perturbations, mapped over the ``C'`` cotangents ``u_c`` of :func:`output_cotangents`
    by ``jax.vmap``, gives ``g_c = (∂f/∂s_l)ᵀ u_c``. Cost: one forward pass plus ``C'``
    backward passes (none for forward-only).
    """
    layers, loss, fisher_type = options.layers, options.loss, options.fisher_type
    names = [layer.name for layer in layers]
    closed, args, sites = _sites(options.model_fn, params, options.leaf_names, inputs)
    sites = _matched(sites, layers)
    zeros = [jnp.zeros(site.output_aval.shape, site.output_aval.dtype) for site in sites]

    def perturbed(deltas: list[Array]) -> tuple[Array, list[Array]]:
        outputs, recorded = replay(closed, args, sites, deltas)
        return outputs[0], recorded

    if fisher_type is FisherType.FORWARD_ONLY:
        outputs, recorded = perturbed(zeros)
    else:
        outputs, pullback, recorded = jax.vjp(perturbed, zeros, has_aux=True)
    loss.check_target(outputs, targets)
    layer_inputs = {
        name: _augment(site.canonical_inputs(a), layer)
        for name, site, a, layer in zip(names, sites, recorded, layers, strict=True)
    }
    scale = loss.scale(outputs, options.num_data)
    if fisher_type is FisherType.FORWARD_ONLY:
        return LayerSignals(layer_inputs, None, scale)
    cotangents = output_cotangents(loss, outputs, targets, fisher_type, options.mc_samples, rng)
    grads = jax.vmap(lambda u: pullback(u)[0])(cotangents)
    output_grads = {
        name: site.canonical_output_grads(g)
        for name, site, g in zip(names, sites, grads, strict=True)
    }
    return LayerSignals(layer_inputs, output_grads, scale)


@partial(jax.jit, static_argnames=("options", "kfac_approx"))
def kronecker_statistics(
    params: PyTree,
    inputs: Any,
    targets: Array,
    rng: JaxExampleRandom | None,
    *,
    options: SignalOptions,
    kfac_approx: KFACApprox,
) -> BatchStatistics:
    """Return one batch's unnormalised factor statistics, compiled once per batch shape."""
    signals = layer_signals(options, params, inputs, targets, rng)
    return batch_statistics(signals, kfac_approx)


@partial(jax.jit, static_argnames=("options", "layers"))
def kronecker_eigencorrections(
    params: PyTree,
    inputs: Any,
    targets: Array,
    rng: JaxExampleRandom | None,
    bases: dict[str, tuple[Array, Array]],
    *,
    options: SignalOptions,
    layers: tuple[JaxKroneckerLayer | SharedWeightLayer, ...],
) -> dict[str, Array]:
    """Return one batch's EKFAC eigenvalue corrections per layer of ``layers``, compiled.

    ``options.layers`` are the uses of ``layers`` (a shared weight's uses in turn).
    """
    signals = layer_signals(options, params, inputs, targets, rng)
    return layer_eigencorrections(signals, layers, bases)
