"""Which parameters a Laplace posterior is over: all, the last layer, or a subnetwork.

A posterior over a subset ``S`` of the parameters keeps the rest at their MAP values, so
its precision is the curvature of the model as a function of ``θ_S`` alone: for whole
tensors (the last layer, a list of tensors) the curvature built on those tensors; for an
index set into the flattened parameters, the submatrix ``E_Sᵀ H E_S`` of the curvature of
the tensors that hold ``S`` (``E_S`` the ``D × |S|`` matrix of unit columns ``e_i``,
``i ∈ S``), as laplace-torch's ``SubnetLaplace`` (Daxberger et al., 2021).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from cola.backends import get_library_fns

from cola_curvature.backends._protocol import CurvatureBackend
from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.options import SubsetOfWeights, parse_option
from cola_curvature.types import Array


@dataclass(frozen=True)
class ParameterSelection:
    """The tensors a posterior touches and, for an index subnetwork, the entries among them.

    Attributes:
        leaves: Positions in ``params`` of the tensors that hold the subset (``None``: all).
        indices: Positions of the subset's entries in the flattened chosen tensors, in the
            order given (``None``: every entry of the chosen tensors).
    """

    leaves: list[int] | None
    indices: np.ndarray | None


def select_parameters(
    backend: CurvatureBackend,
    model: Any,
    data: Iterable[tuple[Any, Any]],
    subset_of_weights: str,
    subnetwork: Any,
) -> ParameterSelection:
    """Return the selection of ``subset_of_weights`` among the backend's ``params``.

    ``"all"``: every entry of ``params``. ``"last_layer"``: the parameters of the last layer
    (:func:`last_layer_leaves`). ``"subnetwork"``: ``subnetwork`` is a list of tensors of
    ``params`` (the same objects), or an index set into the flattened ``params`` (the
    vector of ``torch.nn.utils.parameters_to_vector(params)`` / ``ravel_pytree``): a 1-D
    integer array of distinct positions in ``0..D-1``, or a boolean mask of length ``D``.

    Raises:
        ValueError: for an unknown ``subset_of_weights``, a ``subnetwork`` given with
            another subset or missing for ``"subnetwork"``, an empty subset, indices out of
            range or repeated, and tensors that are not entries of ``params``.
    """
    subset_of_weights = parse_option(SubsetOfWeights, subset_of_weights, "subset_of_weights")
    if (subnetwork is not None) != (subset_of_weights is SubsetOfWeights.SUBNETWORK):
        raise ValueError(
            "subnetwork goes with subset_of_weights='subnetwork' (and only with it); got "
            f"subset_of_weights={subset_of_weights!r} and subnetwork "
            f"{'None' if subnetwork is None else 'given'}."
        )
    if subset_of_weights is SubsetOfWeights.ALL:
        return ParameterSelection(None, None)
    if subset_of_weights is SubsetOfWeights.LAST_LAYER:
        return ParameterSelection(last_layer_leaves(backend, model, data), None)
    tensors = isinstance(subnetwork, (list, tuple)) and len(subnetwork) > 0
    if tensors and all(hasattr(t, "shape") for t in subnetwork):  # else indices, e.g. [0, 3]
        return ParameterSelection(_tensor_positions(_leaves(backend), subnetwork), None)
    return _index_selection(backend.layout.sizes, subnetwork)


def _leaves(backend: CurvatureBackend) -> list[Array]:
    """Return the backend's parameter tensors (torch: the user's; JAX: the pytree's leaves)."""
    return backend.parameter_subset(range(len(backend.layout.sizes)))[1]


def _tensor_positions(leaves: list[Array], tensors: list[Array] | tuple[Array, ...]) -> list[int]:
    """Return the positions of ``tensors`` among ``leaves``, matched by identity."""
    position = {id(leaf): i for i, leaf in enumerate(leaves)}
    found = []
    for i, tensor in enumerate(tensors):
        if id(tensor) not in position:
            raise ValueError(
                f"subnetwork[{i}] (shape {tuple(tensor.shape)}) is not an entry of params; "
                "pass the tensors of params themselves (not copies), or indices."
            )
        found.append(position[id(tensor)])
    if len(set(found)) != len(found):
        raise ValueError("subnetwork lists a tensor more than once; pass each once.")
    return found


def _index_selection(sizes: list[int], subnetwork: Any) -> ParameterSelection:
    """Return the tensors holding an index set (or mask) and the indices among them."""
    total = sum(sizes)
    chosen = np.asarray(subnetwork.cpu() if hasattr(subnetwork, "cpu") else subnetwork)
    if chosen.ndim != 1 or chosen.size == 0:
        raise ValueError(
            "subnetwork must be a non-empty list of tensors of params, a non-empty 1-D "
            f"integer array of indices or a boolean mask of length {total}; got an array of "
            f"shape {chosen.shape}."
        )
    if chosen.dtype == bool:
        if chosen.shape != (total,):
            raise ValueError(
                f"a boolean subnetwork mask needs one entry per parameter ({total}), got "
                f"{chosen.shape[0]}."
            )
        chosen = np.flatnonzero(chosen)
        if chosen.size == 0:
            raise ValueError("the subnetwork mask selects no parameter.")
    elif not np.issubdtype(chosen.dtype, np.integer):
        raise ValueError(f"subnetwork indices must be integers, got dtype {chosen.dtype}.")
    if chosen.min() < 0 or chosen.max() >= total:
        raise ValueError(
            f"subnetwork indices must lie in 0..{total - 1} (params have {total} entries), "
            f"got {chosen.min()}..{chosen.max()}."
        )
    if np.unique(chosen).size != chosen.size:
        raise ValueError("subnetwork indices must not repeat.")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.searchsorted(starts, chosen, side="right") - 1
    leaves = sorted(set(owner.tolist()))
    # the chosen tensors' entries, flattened in params order: positions shift by the sizes
    # of the tensors left out before each owner
    new_starts = dict(zip(leaves, np.cumsum([0] + [sizes[i] for i in leaves[:-1]]), strict=True))
    shift = np.array([starts[i] - new_starts[i] for i in owner])
    return ParameterSelection(leaves, chosen - shift)


def last_layer_leaves(backend: CurvatureBackend, model: Any, data: Iterable[Any]) -> list[int]:
    """Return the positions in ``params`` of the last layer's parameters.

    torch: the last module without children to *finish* its first call in a forward pass
    on the first batch (laplace-torch's ``FeatureExtractor.find_last_layer``) among those
    that own an entry of ``params``; laplace-torch further requires that layer to be the
    last module called and an ``nn.Linear``, and wherever it does, both pick the same
    layer. JAX (a ``model_fn``): the last dense or convolution layer of the traced
    program that KFAC finds (``kronecker_layers``), its weight and bias.

    Raises:
        ValueError: when no layer owns an entry of ``params``.
    """
    if hasattr(model, "named_modules") and hasattr(model, "register_forward_hook"):
        positions = _last_torch_module(backend, model, data)
    else:
        layers = backend.kronecker_layers(data)
        last = layers[-1] if layers else None
        positions = (
            [i for i in (last.weight_index, last.bias_index) if i is not None] if last else []
        )
    if not positions:
        raise ValueError(
            "subset_of_weights='last_layer' found no layer owning an entry of params; pass "
            "the tensors as subnetwork=[...] with subset_of_weights='subnetwork'."
        )
    return positions


def _last_torch_module(backend: CurvatureBackend, model: Any, data: Iterable[Any]) -> list[int]:
    """Return the positions of the parameters of the last leaf module run that owns some."""
    position = {id(leaf): i for i, leaf in enumerate(_leaves(backend))}
    order: dict[str, list[int]] = {}

    def recorder(name: str, module: Any) -> Any:
        def hook(*_: Any) -> None:
            owned = [position[id(p)] for p in module.parameters() if id(p) in position]
            if owned:
                order.setdefault(name, owned)

        return hook

    handles = [
        module.register_forward_hook(recorder(name, module))
        for name, module in model.named_modules()
        if next(module.children(), None) is None
    ]
    try:
        with backend.preserved_state():  # a DataLoader's iterator draws from the global RNG
            model(next(iter(data))[0])
    finally:
        for handle in handles:
            handle.remove()
    return list(order.values())[-1] if order else []


def index_array(vector: Array, indices: np.ndarray) -> Array:
    """Return ``indices`` as an integer array of ``vector``'s library and device."""
    xnp = get_library_fns(vector.dtype)
    return xnp.arange(vector.shape[0], device=xnp.get_device(vector))[indices]


def dense_submatrix(curvature: CurvatureOperator, rows: Array) -> Array:
    """Return ``E_Sᵀ H E_S`` from ``|S|`` products ``H e_i`` (``H`` itself is never formed)."""
    xnp, device = curvature.xnp, curvature.device
    unit = xnp.zeros((curvature.shape[0], rows.shape[0]), dtype=curvature.dtype, device=device)
    unit = xnp.update_array(unit, 1, rows, xnp.arange(rows.shape[0], device=device))
    return (curvature @ unit)[rows]
