"""Kronecker-factored approximate curvature (KFAC) as a structured CoLA operator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from cola.backends import get_library_fns

from cola_curvature._checks import check_mc_samples
from cola_curvature.backends import CurvatureBackend
from cola_curvature.kfac_statistics.moments import SignalRequest
from cola_curvature.kfac_statistics.shared_weights import (
    SharedWeightLayer,
    nearest_kronecker,
    oriented_factors,
    use_layers,
)
from cola_curvature.operators._bound import DataBound
from cola_curvature.operators._data import CurvatureData
from cola_curvature.operators.diagonal import DiagonalCurvature
from cola_curvature.operators.empirical_fisher import EmpiricalFisher
from cola_curvature.operators.fisher import FisherMC
from cola_curvature.operators.ggn import GGN
from cola_curvature.operators.kfac_permutations import (
    block_permutation,
    cached_permutations,
    grid_key,
)
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.kronecker_blocks import KroneckerBlock
from cola_curvature.operators.parameter_kronecker import ParameterKroneckerFactored
from cola_curvature.options import (
    FisherType,
    KFACApprox,
    SharedWeights,
    Uncovered,
    parse_option,
)
from cola_curvature.types import Array

#: The largest dense block ``uncovered="dense"`` builds: ``d² · itemsize`` bytes for ``d``
#: uncovered entries. 2 GiB is ``d ≈ 16 000`` in float64 (``≈ 23 000`` in float32), a few
#: per cent of a workstation's memory; above it ``uncovered="diagonal"`` is the choice.
DENSE_BLOCK_LIMIT_BYTES = 2 * 1024**3


def kronecker_factors(
    backend: CurvatureBackend,
    layers: Sequence[Any],
    data: CurvatureData,
    fisher_type: FisherType,
    kfac_approx: KFACApprox,
    mc_samples: int,
    seed: int,
) -> dict[str, tuple[Array, Array]]:
    """Return ``(G_l, A_l)`` per layer name, aggregated exactly over all batches.

    A weight several calls use (:class:`SharedWeightLayer`) gets the nearest Kronecker
    product of its uses' blocks (:func:`nearest_kronecker`), as ``(row, column)`` factors.

    ``A = (1 / (N T)) Σ_{n,t} ã ãᵀ`` (expand) or ``(1 / N) Σ_n ā ā ᵀ`` (reduce);
    ``G = R Σ g gᵀ`` with the loss scaling ``R`` already applied per batch, or ``I`` for
    ``forward-only``. Sampled targets (``mc``) come from streams keyed by ``seed`` and each
    example's global index (:meth:`CurvatureData.sampled_batches`), whatever the batching.
    """
    input_sums: dict[str, Array] = {}
    output_sums: dict[str, Array] = {}
    positions: dict[str, int] = {}
    request = SignalRequest(tuple(layers), data.num_data, fisher_type, mc_samples)
    with backend.preserved_state():
        for batch, rng in data.sampled_batches("KFAC factors", seed):
            stats = backend.kronecker_statistics(batch, request, kfac_approx, rng)
            for name, moment in stats.input_moments.items():
                if positions.setdefault(name, stats.positions[name]) != stats.positions[name]:
                    raise ValueError(
                        f"layer {name!r} sees {stats.positions[name]} shared positions in one "
                        f"batch and {positions[name]} in another; KFAC needs a fixed number."
                    )
                _accumulate(input_sums, name, moment)
            for name, moment in stats.output_moments.items():
                _accumulate(output_sums, name, moment)
    input_sums = {name: data.combine(value) for name, value in input_sums.items()}
    output_sums = {name: data.combine(value) for name, value in output_sums.items()}
    factors = {}
    for layer in use_layers(layers):
        count = data.num_data * (positions[layer.name] if kfac_approx is KFACApprox.EXPAND else 1)
        input_factor = input_sums[layer.name]
        input_factor /= count  # this build's own sum: in place for torch, a new array for JAX
        if fisher_type is FisherType.FORWARD_ONLY:
            xnp = get_library_fns(input_factor.dtype)
            output_factor = xnp.eye(
                layer.out_features,
                layer.out_features,
                dtype=input_factor.dtype,
                device=xnp.get_device(input_factor),
            )
        else:
            output_factor = output_sums[layer.name]
        factors[layer.name] = (output_factor, input_factor)
    for layer in layers:
        if isinstance(layer, SharedWeightLayer):
            pairs = [oriented_factors(layer, use, *factors.pop(use.name)) for use in layer.uses]
            factors[layer.name] = nearest_kronecker(pairs)
    return factors


def _accumulate(sums: dict[str, Array], name: str, moment: Array) -> None:
    """Add ``moment`` to ``sums[name]`` out of place; the first one is kept as it is (no copy)."""
    sums[name] = moment if name not in sums else sums[name] + moment


class KFAC(DataBound, ParameterKroneckerFactored):
    r"""KFAC: per layer ``C_l ≈ G_l ⊗ A_l`` (Martens & Grosse, 2015; Grosse & Martens, 2016).

    For a ``Linear`` or ``Conv2d`` layer ``s = W ã`` with augmented input ``ã = [a, 1]``
    (when the bias is in ``params``, weight and bias share one block):
    ``A = (1/(N T)) Σ_{n,t} ã_{n,t} ã_{n,t}ᵀ`` and ``G = R Σ_{n,t,c} g_{n,t,c} g_{n,t,c}ᵀ``
    where ``g_{n,t,c} = (∂f_n/∂s_{n,t})ᵀ u_{n,c}`` backpropagates the columns ``u_c`` chosen by
    ``fisher_type`` (type-2: the loss Hessian factor, ``Σ_c u_c u_cᵀ = ∇²_f ℓ``; mc: sampled
    gradients; empirical: the observed gradient; forward-only: ``G = I``), ``T`` counts shared
    positions (sequence entries of a ``Linear``, output pixels of a ``Conv2d``), and ``R`` is
    the loss scaling. ``kfac_approx="reduce"`` averages ``ã`` and sums ``g`` over positions
    per example first (Eschenhagen et al., 2023, arXiv:2311.00636). The weight's row-major
    ``vec`` gives ``∇ vec(W) = g ⊗ ã``, so the block is ``G ⊗ A``; the operator is
    ``P · BlockDiag(G_l ⊗ A_l) · Pᵀ`` with ``P`` mapping blocks to the user's ``params`` order.

    An embedding ``s = Wᵀ e_x`` (weight ``V × d``, one-hot input ``e_x``) is the same with
    ``Wᵀ`` as the weight: its block is ``G ⊗ A`` on ``vec(Wᵀ)`` with the diagonal
    ``A = diag(token counts) / (N T)``, stored as a vector (never ``V × V``); tokens never
    seen (and a padding index) give zero rows, so the undamped block is singular. Under
    ``reduce`` only the diagonal of the averaged one-hot moment is kept.

    Exact cases: a single example, and deep linear networks with MSE (per shared position for
    expand; with positions averaged before the loss for reduce), where it equals the GGN
    (type-2) or empirical Fisher (empirical) block.

    Cost of the build per batch: one forward pass plus ``C`` (type-2), ``mc_samples`` (mc)
    or one (empirical) backward passes (JAX batches them by ``vmap``; torch runs them in turn,
    its ``vmap`` rules for pooling being slower); forward-only needs none. The
    dispatch rules invert, take logdet, eig, sqrt, trace and diag from the factors' eigen-
    decompositions, ``O(Σ_l out_l³ + in_l³)``. Annotation: ``PSD``.

    A torch model needs no annotation either: its layers are the ``F.linear``,
    ``F.conv2d`` (``groups=1``) and ``F.embedding`` calls whose weight (or bias) is one of
    ``params``, recorded during a forward pass on the first example of ``data`` and on
    two copies of it (see :mod:`cola_curvature.backends.torch.kfac`). This finds
    ``nn.Linear``, ``nn.Conv2d`` (any ``padding_mode``), ``nn.Embedding`` and the weights
    ``nn.MultiheadAttention`` calls functionally: its packed ``in_proj_weight``
    (``3E × E``, with ``in_proj_bias``) is one block, one ``G`` over queries, keys and
    values together, as nanoGPT's packed ``c_attn`` Linear; ``out_proj`` is another. A
    call whose output all examples share (a position table ``wpe(arange(T))``) is left
    uncovered.

    A weight used by several calls (an lm-head tied to the token embedding, a layer applied
    twice) gets one block: each use ``k`` alone would give ``B_k ⊗ C_k`` (the embedding's
    on the transposed table, turned to the weight's orientation: ``diag(counts) ⊗ G_emb``
    next to the lm-head's ``G_head ⊗ A_head``), and the block is the Frobenius-nearest
    Kronecker product ``X ⊗ Y`` to ``Σ_k B_k ⊗ C_k`` (Van Loan & Pitsianis; ``X`` a convex
    combination of the row factors, ``Y`` a non-negative one of the column factors: see
    :mod:`cola_curvature.kfac_statistics.shared_weights`). The terms between uses are dropped, as
    those between positions; the exact block stays available with
    ``shared_weights="uncovered"`` and ``uncovered="dense"`` (or its diagonal with
    ``"diagonal"``). EKFAC refits the eigenvalues of ``X ⊗ Y``'s eigenbasis to the true
    per-example gradients of the shared weight (both uses summed).

    A JAX ``model_fn(params, x)`` needs no annotation: its layers are found in the traced
    program (a ``dot_general`` or ``conv_general_dilated`` whose weight is a parameter leaf,
    with an optional bias leaf added right after, and a ``gather`` of whole rows of a 2-D
    leaf, an embedding lookup ``W[x]``; see :mod:`cola_curvature.backends.jax.jaxpr_layers`),
    with the leading free axis of a layer input as the example axis and any further free
    axes as shared positions ``T``.

    Args:
        model: The model: a torch module whose linear, conv2d and embedding calls use
            ``params`` (above), or a JAX ``model_fn`` (above).
        loss_func: As for :class:`~cola_curvature.GGN`.
        params: The parameters; each must belong to a supported layer unless ``uncovered``
            is ``"diagonal"`` or ``"dense"``.
        data: A re-iterable of ``(X, y)`` batches.
        fisher_type: ``"type-2"`` (default), ``"mc"``, ``"empirical"`` or ``"forward-only"``.
        kfac_approx: ``"expand"`` (default) or ``"reduce"``.
        mc_samples: Samples per example for ``"mc"``.
        seed: Seed of the sampled targets for ``"mc"``.
        uncovered: What parameters no supported layer owns get (norm scales and shifts,
            position embeddings, ...); ``d`` is their number of entries. ``"error"``
            (default) raises and names them. ``"diagonal"`` gives them the exact diagonal
            of the matching curvature (GGN for type-2, Monte-Carlo Fisher with the same
            ``seed`` and ``mc_samples`` for mc, empirical Fisher for empirical; see
            :class:`~cola_curvature.DiagonalCurvature`) as one diagonal block, ``O(d)``
            memory. ``"dense"`` gives them one exact dense block of that curvature,
            ``O(d²)`` memory and ``d`` products to build; refused when ``d² · itemsize``
            exceeds ``DENSE_BLOCK_LIMIT_BYTES`` (2 GiB). Neither fits
            ``fisher_type="forward-only"``.
        separate_weight_and_bias: ``False`` (default): a layer's weight and bias share one
            block ``G ⊗ A`` with ``A`` over ``ã = [a, 1]``, which keeps their cross terms
            and is exact where KFAC is exact. ``True``: two blocks, ``G ⊗ A_W`` for the
            weight and ``G`` for the bias (curvlinops' default and laplace-torch's ``kron``
            convention; the same ``G``, the weight–bias terms dropped).
        shared_weights: ``"kronecker"`` (default): a weight several calls use gets the
            nearest Kronecker product of its uses' blocks (above); ``"uncovered"``: it is
            left to ``uncovered``.
        **data_options: ``num_data``, ``batch_size_fn``, ``check_deterministic``,
            ``progressbar``, ``distributed`` (the factor statistics are summed over the
            ranks), as for every data-bound operator
            (:class:`~cola_curvature.operators._bound.DataBound`).
    """

    def __init__(
        self,
        model: Any,
        loss_func: Any,
        params: Any,
        data: Any,
        *,
        fisher_type: str | FisherType = "type-2",
        kfac_approx: str | KFACApprox = "expand",
        mc_samples: int = 1,
        seed: int = 0,
        uncovered: str | Uncovered = "error",
        shared_weights: str | SharedWeights = "kronecker",
        separate_weight_and_bias: bool = False,
        **data_options: Any,
    ) -> None:
        self.fisher_type = parse_option(FisherType, fisher_type, "fisher_type")
        self.kfac_approx = parse_option(KFACApprox, kfac_approx, "kfac_approx")
        self.uncovered = parse_option(Uncovered, uncovered, "uncovered")
        self.shared_weights = parse_option(SharedWeights, shared_weights, "shared_weights")
        if not isinstance(separate_weight_and_bias, bool):
            raise TypeError(
                f"separate_weight_and_bias must be True or False, got {separate_weight_and_bias!r}."
            )
        self.separate_weight_and_bias = separate_weight_and_bias
        check_mc_samples(mc_samples)
        self._bind(model, loss_func, params, data, **data_options)
        data = self._data
        self._build_options = {"mc_samples": mc_samples, "seed": seed}
        self.layers = self._kronecker_layers(data.source)
        missing = self._uncovered_indices()
        if missing:
            self._check_uncovered(missing)
        factors = kronecker_factors(
            self._backend, self.layers, data, self.fisher_type, self.kfac_approx, mc_samples, seed
        )
        blocks = [
            KroneckerBlock(output_factor, input_factor)
            for layer in self.layers
            for output_factor, input_factor in self._split(layer, *factors[layer.name])
        ]
        if missing:
            blocks.append(self._uncovered_block(loss_func, missing))
        permutation, inverse = self._permutations(missing, blocks)
        KroneckerFactored.__init__(self, blocks, permutation, inverse_permutation=inverse)

    def _separated(self, layer: Any) -> bool:
        """Return whether ``layer`` gets a weight block and a bias block."""
        return self.separate_weight_and_bias and None not in (layer.weight_index, layer.bias_index)

    def _split(self, layer: Any, output_factor: Array, input_factor: Array) -> list[tuple]:
        """Return the ``(G, A)`` of the layer's blocks: ``(G, A_W)`` and ``(G, [1])`` if separated.

        ``A_W`` is the augmented ``A`` without the bias row and column; the bias block's
        input factor is ``A``'s last diagonal entry, the mean of ``1 · 1``: exactly 1.
        """
        if not self._separated(layer):
            return [(output_factor, input_factor)]
        columns = layer.in_features - 1
        weight = input_factor[:columns, :columns]
        return [(output_factor, weight), (output_factor, input_factor[columns:, columns:])]

    def layer_blocks(self) -> list[dict[str, Any]]:
        """Return, per layer of :attr:`layers`, its blocks by role.

        ``{"weight": W block, "bias": b block}`` for a layer split by
        ``separate_weight_and_bias`` (either may be ``None`` when that parameter is not in
        ``params``), else ``{"joint": block}`` (weight and bias together, or the one present).
        """
        blocks = iter(self.blocks)
        roles = []
        for layer in self.layers:
            if self._separated(layer):
                roles.append({"weight": next(blocks), "bias": next(blocks)})
            elif self.separate_weight_and_bias:
                block = next(blocks)
                weight = layer.weight_index is not None
                roles.append(
                    {"weight": block if weight else None, "bias": None if weight else block}
                )
            else:
                roles.append({"joint": next(blocks)})
        return roles

    def _kronecker_layers(self, source: Any) -> list[Any]:
        """Return the backend's layers; shared weights too unless ``shared_weights="uncovered"``."""
        layers = self._backend.kronecker_layers(source)
        if self.shared_weights is SharedWeights.KRONECKER:
            return layers
        reason = "used by several calls (a tied weight), and shared_weights='uncovered'"
        reasons = getattr(self._backend, "uncovered_reasons", {})
        for layer in layers:
            if isinstance(layer, SharedWeightLayer):
                reasons.update({i: reason for i in (layer.weight_index, layer.bias_index)})
        return [layer for layer in layers if not isinstance(layer, SharedWeightLayer)]

    def _uncovered_indices(self) -> list[int]:
        """Return the positions in ``params`` (flat order) that no supported layer owns."""
        covered = {layer.weight_index for layer in self.layers}
        covered |= {layer.bias_index for layer in self.layers}
        return [i for i in range(len(self._backend.layout.sizes)) if i not in covered]

    def _check_uncovered(self, missing: list[int]) -> None:
        """Raise, before anything is built, unless ``uncovered`` can cover ``missing``."""
        names, sizes = self._backend.layout.names, self._backend.layout.sizes
        if self.uncovered is Uncovered.ERROR:
            reasons = getattr(self._backend, "uncovered_reasons", {})
            listed = ", ".join(
                f"params[{i}] ({names[i]!r}, {sizes[i]} entries"
                + (f"; {reasons[i]}" if i in reasons else "")
                + ")"
                for i in missing
            )
            raise ValueError(
                "No supported layer (torch: a linear, conv2d or embedding call; JAX: a "
                "dot_general, conv_general_dilated or row gather with the leaf as its weight) owns "
                f"{listed}; pass uncovered='diagonal' for their exact curvature diagonal, "
                "uncovered='dense' for an exact dense block of them, or leave them out of params."
            )
        if self.fisher_type is FisherType.FORWARD_ONLY:
            raise ValueError(
                f"uncovered={self.uncovered.value!r} needs a fisher_type with an output-space "
                "matrix ('type-2', 'mc' or 'empirical'), not 'forward-only'."
            )
        if self.uncovered is Uncovered.DENSE:
            size = sum(sizes[i] for i in missing)
            needed = size**2 * self._backend.dtype.itemsize
            if needed > DENSE_BLOCK_LIMIT_BYTES:
                raise ValueError(
                    f"uncovered='dense' would build a {size} x {size} block of the uncovered "
                    f"parameters ({needed / 1024**3:.1f} GiB, above the limit of "
                    f"{DENSE_BLOCK_LIMIT_BYTES / 1024**3:.1f} GiB); pass uncovered='diagonal' "
                    "for their exact curvature diagonal instead."
                )

    def _uncovered_block(self, loss_func: Any, missing: list[int]) -> Any:
        """Return the exact curvature block of the uncovered parameters, diagonal or dense.

        Built on this operator's data (:meth:`CurvatureData.rebound`): nothing is counted or
        checked again.
        """
        model, subset = self._backend.parameter_subset(missing)
        source, options = self._data, {"check_deterministic": False}
        sampling = {
            "mc_samples": self._build_options["mc_samples"],
            "seed": self._build_options["seed"],
        }
        if self.uncovered is Uncovered.DIAGONAL:
            fisher_type = self.fisher_type
            diagonal = DiagonalCurvature(
                model, loss_func, subset, source, fisher_type=fisher_type, **sampling, **options
            )
            return diagonal.blocks[0]
        if self.fisher_type is FisherType.TYPE2:
            operator = GGN(model, loss_func, subset, source, **options)
        elif self.fisher_type is FisherType.MC:
            operator = FisherMC(model, loss_func, subset, source, **sampling, **options)
        else:
            operator = EmpiricalFisher(model, loss_func, subset, source, **options)
        dense = operator.to_dense()
        xnp = get_library_fns(dense.dtype)
        one = xnp.ones((1, 1), dtype=dense.dtype, device=xnp.get_device(dense))
        return KroneckerBlock(dense, one)

    def _permutations(self, missing: list[int], blocks: Sequence[Any]) -> tuple[Array, Array]:
        """Return the user-order position of every block-order coordinate, and its inverse.

        Shared with the last operators built on the same layout (:func:`cached_permutations`);
        otherwise written in NumPy into one array each (``O(D)``, no ``D``-sized temporaries
        but the inverse's ``arange``) and converted once, not scattered on the device.
        """
        layout = self._backend.layout
        xnp, device = blocks[0].xnp, blocks[0].device
        key = (
            tuple((grid_key(layer), self._separated(layer)) for layer in self.layers),
            tuple(missing),
            tuple(layout.sizes),  # the offsets are their running sums
            xnp.__name__,
            str(device),
        )
        return cached_permutations(key, lambda: self._written_permutations(missing, xnp, device))

    def _written_permutations(self, missing: list[int], xnp: Any, device: Any) -> tuple:
        """Return :meth:`_permutations`' two arrays, written anew."""
        sizes, offsets = self._backend.layout.sizes, self._backend.layout.offsets
        runs = [layer.out_features * layer.in_features for layer in self.layers]
        permutation = np.empty(sum(runs) + sum(sizes[i] for i in missing), dtype=np.int64)
        start = 0
        for layer, run in zip(self.layers, runs, strict=True):
            part = permutation[start : start + run]
            block_permutation(layer, offsets, self._separated(layer), out=part)
            start += run
        for i in missing:
            np.add(np.arange(sizes[i]), offsets[i], out=permutation[start : start + sizes[i]])
            start += sizes[i]
        inverse = np.empty_like(permutation)
        inverse[permutation] = np.arange(permutation.size)
        return (
            xnp.array(permutation, dtype=None, device=device),
            xnp.array(inverse, dtype=None, device=device),
        )
